package sandbox

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kpr-dev/kpr/node/agent"
)

// Kpr runs kpr on a sandbox node with its own cgroup (the socket hooks attach there; clients
// that should be load-balanced start in it through CgroupFD) and its own bpffs, so nothing
// of the machine's is touched.
type Kpr struct {
	Node     *Node
	Bin      string // the kpr binary
	Cgroup   string // cgroup v2 directory kpr attaches to (removed by ControlPlane.Close)
	CgroupFD int    // open fd of Cgroup, for Cmd.CgroupFD / Exec
	PinDir   string
	RunDir   string
	Env      []string // extra environment for `kpr run` (e.g. NOTIFY_SOCKET)
	// Caps, when set, are the only capabilities `kpr run` keeps (as kpr.service's
	// CapabilityBoundingSet does): it starts under setpriv with this bounding set, e.g.
	// []string{"CAP_BPF", "CAP_NET_ADMIN"}.
	Caps []string
	Proc *Process // the running `kpr run`, nil when stopped

	bpffs string
}

// BuildKpr builds cmd/kpr into dir.
func BuildKpr(dir string) (string, error) { return BuildKprAs(dir, "kpr", "") }

// BuildKprAs builds cmd/kpr into dir/name with version stamped into it (empty: the default),
// as a package build does; tests that replace a running kpr's binary use it.
func BuildKprAs(dir, name, version string) (string, error) {
	root, err := moduleRoot()
	if err != nil {
		return "", err
	}
	out, err := filepath.Abs(filepath.Join(dir, name))
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(context.Background(), probeBuildTimeout)
	defer cancel()
	args := []string{"build", "-o", out}
	if version != "" {
		args = append(args, "-ldflags", "-X github.com/kpr-dev/kpr/node/agent.Version="+version)
	}
	cmd := exec.CommandContext(ctx, "go", append(args, "./cmd/kpr")...)
	cmd.Dir = root
	if msg, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build ./cmd/kpr: %w: %s", err, msg)
	}
	return out, nil
}

// NewKpr prepares kpr for node n: its own cgroup (see ControlPlane.NewCgroup) and a fresh
// bpffs in the node's directory. Close runs `kpr cleanup` and unmounts the bpffs; call it
// before ControlPlane.Close.
func (n *Node) NewKpr(bin string) (*Kpr, error) {
	k := &Kpr{Node: n, Bin: bin}
	cg, err := n.cp.NewCgroup(n.Name)
	if err != nil {
		return nil, err
	}
	k.Cgroup, k.CgroupFD = cg.Path, cg.FD
	dir := filepath.Join(n.NodeDir, "kpr")
	k.bpffs = filepath.Join(dir, "bpffs")
	k.PinDir = filepath.Join(k.bpffs, "kpr")
	k.RunDir = filepath.Join(dir, "run")
	if err := os.MkdirAll(k.bpffs, 0o700); err != nil {
		k.Close()
		return nil, err
	}
	if err := unix.Mount("bpffs", k.bpffs, "bpf", 0, "mode=0700"); err != nil {
		k.bpffs = ""
		k.Close()
		return nil, fmt.Errorf("sandbox: mounting bpffs: %w", err)
	}
	return k, nil
}

// Args are the settings every kpr command of this node uses.
func (k *Kpr) Args() []string {
	return []string{
		"--config", "",
		"--kubelet-kubeconfig", k.Node.KubeletConf(),
		"--kubeadm-config", k.Node.KubeadmConfig(),
		"--node-name", k.Node.Name,
		"--cgroup-path", k.Cgroup,
		"--bpf-pin-dir", k.PinDir,
		"--run-dir", k.RunDir,
		"--min-sync-period", "100ms",
	}
}

// Start runs `kpr run` in the node's namespace and waits (bounded) until it has synced with
// the API server.
func (k *Kpr) Start(ctx context.Context, timeout time.Duration) error {
	if k.Proc != nil {
		return errors.New("sandbox: kpr already running")
	}
	started := time.Now()
	cmd := Cmd{Name: k.Bin, Args: append([]string{"run"}, k.Args()...), Env: k.Env}
	if len(k.Caps) > 0 {
		set := "-all"
		for _, c := range k.Caps {
			set += ",+" + strings.ToLower(strings.TrimPrefix(c, "CAP_"))
		}
		cmd.Args = append([]string{"--bounding-set=" + set, "--", cmd.Name}, cmd.Args...)
		cmd.Name = "setpriv"
	}
	p, err := k.Node.StartCmd(ctx, cmd)
	if err != nil {
		return err
	}
	k.Proc = p
	deadline := time.Now().Add(timeout)
	for {
		if p.Exited() {
			k.Proc = nil
			return fmt.Errorf("kpr exited: %s", p.LogTail(1000))
		}
		st, err := agent.ReadStatus(k.RunDir)
		if err == nil && st.PID == p.Pid() && st.Synced && !st.LastSync.Before(started) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("kpr not synced within %s: %s", timeout, p.LogTail(1000))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// UnitCaps returns the capabilities kpr.service keeps (its CapabilityBoundingSet line in
// systemd/kpr.service), so tests can run kpr with those and no others. A capability the
// machine's own bounding set lacks stays out too (this VM's root has no CAP_SYS_RESOURCE,
// which kpr only needs on kernels that charge BPF memory to RLIMIT_MEMLOCK).
func UnitCaps() ([]string, error) {
	root, err := moduleRoot()
	if err != nil {
		return nil, err
	}
	data, err := os.ReadFile(filepath.Join(root, "systemd", "kpr.service"))
	if err != nil {
		return nil, err
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "CapabilityBoundingSet="); ok {
			return strings.Fields(v), nil
		}
	}
	return nil, errors.New("sandbox: systemd/kpr.service has no CapabilityBoundingSet line")
}

// Stop sends SIGTERM and waits for kpr to exit; it must exit cleanly (status 0).
func (k *Kpr) Stop() error {
	if k.Proc == nil {
		return nil
	}
	p := k.Proc
	k.Proc = nil
	if err := p.Signal(syscall.SIGTERM); err != nil {
		return err
	}
	select {
	case <-p.Done():
	case <-time.After(stopGrace):
		_ = p.Kill()
		return fmt.Errorf("kpr did not stop on SIGTERM: %s", p.LogTail(1000))
	}
	if err := p.Wait(); err != nil {
		return fmt.Errorf("kpr exited with %v: %s", err, p.LogTail(1000))
	}
	return nil
}

// Kill ends `kpr run` with SIGKILL, as a crash or the OOM killer would, and waits for it.
func (k *Kpr) Kill() error {
	if k.Proc == nil {
		return nil
	}
	p := k.Proc
	k.Proc = nil
	if err := p.Kill(); err != nil {
		return err
	}
	select {
	case <-p.Done():
		return nil
	case <-time.After(stopGrace):
		return fmt.Errorf("kpr did not end on SIGKILL")
	}
}

// Run runs a kpr subcommand (status, service list, cleanup) in the node's namespace.
func (k *Kpr) Run(ctx context.Context, args ...string) (string, error) {
	out, err := k.Node.Exec(ctx, 0, k.Bin, append(args, k.Args()...)...)
	return string(out), err
}

// Close stops kpr, runs `kpr cleanup`, unmounts the bpffs and removes the cgroup.
func (k *Kpr) Close() error {
	var errs []error
	if err := k.Stop(); err != nil {
		errs = append(errs, err)
	}
	if k.bpffs != "" {
		ctx, cancel := context.WithTimeout(context.Background(), cmdTimeout)
		if out, err := k.Run(ctx, "cleanup"); err != nil {
			errs = append(errs, fmt.Errorf("kpr cleanup: %w: %s", err, out))
		}
		cancel()
		if err := unix.Unmount(k.bpffs, unix.MNT_DETACH); err != nil {
			errs = append(errs, fmt.Errorf("unmounting %s: %w", k.bpffs, err))
		}
		k.bpffs = ""
	}
	return errors.Join(errs...)
}
