package bench

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/kpr-dev/kpr/test/sandbox"
)

// bench is one run: the sandbox, the node's pods and the proxies.
type bench struct {
	cfg Config
	log func(format string, args ...any)
	res *Results

	cp   *sandbox.ControlPlane
	node *sandbox.Node // where the proxy under test runs
	kpr  *sandbox.Kpr
	// client is where the load generator runs: a pod on node for ClusterIP, a host outside
	// the cluster for NodePort.
	client   clientNS
	backends []*sandbox.Pod

	loadgen   string // binaries
	kubeProxy string

	cpu            *cpuMeter
	disturbed      bool          // the last measurement was disturbed by other processes
	disturbedSpent time.Duration // spent on retakes and in waitQuiet so far
	// plain is a cgroup beside kpr's with no program attached, for the clients of the other
	// paths: the same cgroup depth as kpr's client, without kpr.
	plain *sandbox.Cgroup

	// clientCPUs and serverCPUs pin the clients and the servers apart (taskset lists), so
	// where the scheduler happens to put them does not swing the figures; empty: unpinned.
	clientCPUs, serverCPUs string

	// bpfStats keeps the kernel's BPF run-time statistics on while the bench runs (closing it
	// turns them off again); nil when they could not be enabled.
	bpfStats io.Closer

	// svcTarget is the measured Service as the client reaches it: ClusterIP:80, or node1's
	// address and the NodePort.
	svcTarget string
	fillers   int // filler Services created so far
}

// clientNS is a namespace the load generator runs in: sandbox.Pod or sandbox.Host.
type clientNS interface {
	StartCmd(ctx context.Context, c sandbox.Cmd) (*sandbox.Process, error)
	Exec(ctx context.Context, cgroupFD int, name string, args ...string) ([]byte, error)
}

// Run builds the sandbox, measures every path at every scale and removes everything again,
// also when ctx ends early. The results are returned even when err is not nil: they hold what
// was measured before the failure.
func Run(ctx context.Context, cfg Config) (res *Results, err error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("bench: %w", err)
	}
	if os.Geteuid() != 0 {
		return nil, errors.New("bench: creates network namespaces and loads BPF programs: run it as root")
	}
	if cfg.Log == nil {
		cfg.Log = func(string, ...any) {}
	}
	if cfg.Prefix == "" {
		buf := make([]byte, 3)
		if _, err := rand.Read(buf); err != nil {
			return nil, err
		}
		cfg.Prefix = "kpr-bench-" + hex.EncodeToString(buf)
	}
	b := &bench{cfg: cfg, log: cfg.Log}
	b.res = &Results{Scenario: cfg.Scenario, Config: summarizeConfig(cfg), Started: time.Now(), Machine: describeMachine()}
	res = b.res
	rootBefore := snapshotRoot(ctx)

	defer func() {
		if cerr := b.close(); cerr != nil {
			err = errors.Join(err, cerr)
		}
		if left := leftovers(cfg.Prefix, cfg.WorkDir); len(left) > 0 {
			err = errors.Join(err, fmt.Errorf("bench: left behind: %v", left))
		} else {
			b.note("Cleanup verified: no %s* network namespace, cgroup or bpffs mount is left.", cfg.Prefix)
		}
		if diff := rootBefore.diff(snapshotRoot(context.Background())); len(diff) > 0 {
			b.note("The root network namespace changed during the run (this benchmark only works in sandbox namespaces; other processes share the machine): %v", diff)
		} else {
			b.note("The root network namespace's links, addresses, routes, nftables ruleset and the checked sysctls are unchanged after the run.")
		}
		res.Finished = time.Now()
		if err != nil {
			res.Err = err.Error()
		}
	}()

	if err := b.setup(ctx); err != nil {
		return res, err
	}
	for _, scale := range cfg.Scales {
		sr := &ScaleResult{Services: scale}
		res.Scales = append(res.Scales, sr)
		if err := b.grow(ctx, sr); err != nil {
			return res, err
		}
		if err := b.runScale(ctx, sr); err != nil {
			return res, err
		}
	}
	return res, nil
}

func (b *bench) note(format string, args ...any) {
	b.res.Notes = append(b.res.Notes, fmt.Sprintf(format, args...))
}

// setup starts the control plane and the node, builds the binaries, starts the servers and
// creates the measured Service.
func (b *bench) setup(ctx context.Context) error {
	var err error
	binDir := filepath.Join(b.cfg.WorkDir, "bin")
	if err := os.MkdirAll(binDir, 0o755); err != nil {
		return err
	}
	b.log("building kpr and loadgen")
	kprBin, version, err := buildKpr(binDir, b.cfg.KprRev)
	if err != nil {
		return err
	}
	b.res.Versions = append(b.res.Versions, KV{"kpr", version})
	if b.loadgen, err = buildLoadgen(binDir); err != nil {
		return err
	}
	if b.kubeProxy, err = kubeProxyBinary(b.cfg.K8sBinDir); err != nil && b.wantsKubeProxy() {
		return err
	}
	b.res.Versions = append(b.res.Versions, toolVersions(ctx, b.kubeProxy)...)

	b.log("starting the sandbox (%s)", b.cfg.Prefix)
	b.cp, err = sandbox.Start(ctx, sandbox.Options{
		Prefix:    b.cfg.Prefix,
		WorkDir:   filepath.Join(b.cfg.WorkDir, "sandbox"),
		K8sBinDir: b.cfg.K8sBinDir,
		Log:       b.log,
	})
	if err != nil {
		return err
	}
	b.cpu = &cpuMeter{self: os.Getpid(), ours: b.netnsInodes}
	if n := runtime.NumCPU(); b.cfg.Pin && n > 1 {
		b.clientCPUs, b.serverCPUs = "0", fmt.Sprintf("1-%d", n-1)
		b.res.Pinning = "clients on CPU 0, servers on CPU 1"
		if n > 2 {
			b.res.Pinning = "clients on CPU 0, servers on CPUs " + b.serverCPUs
		}
	}
	if slices.ContainsFunc(b.cfg.Paths, Path.isKpr) {
		// While this fd is open the kernel counts each BPF program's runs and run time (the
		// count costs two clock reads per run, for every program on the machine); closing it
		// turns counting off again unless something else holds it on.
		if b.bpfStats, err = ebpf.EnableStats(unix.BPF_STATS_RUN_TIME); err != nil {
			b.bpfStats = nil
			b.note("BPF run-time statistics could not be enabled (%v): kpr's datapath cost per connection is not measured.", err)
		}
	}
	if b.node, err = b.cp.AddNode(ctx, "node1", 1); err != nil {
		return err
	}
	if b.kpr, err = b.node.NewKpr(kprBin); err != nil {
		return err
	}
	if b.plain, err = b.cp.NewCgroup("client"); err != nil {
		return err
	}
	backendNode := b.node
	if b.cfg.Scenario == NodePort {
		if backendNode, err = b.cp.AddNode(ctx, "node2", 2); err != nil {
			return err
		}
	}
	for i := range backendPods {
		name := fmt.Sprintf("web-%d", i)
		p, err := backendNode.AddPod(ctx, measuredNamespace, name, firstBackendSlot+i)
		if err != nil {
			return err
		}
		if err := noTimeWait(ctx, p); err != nil {
			return err
		}
		bin, args := pinned(b.serverCPUs, b.loadgen, []string{"serve", "--name", name, "--port", fmt.Sprint(backendPort)})
		if _, err := p.Start(ctx, bin, args...); err != nil {
			return err
		}
		b.backends = append(b.backends, p)
	}
	if b.cfg.Scenario == NodePort {
		if b.client, err = b.externalClient(ctx, backendNode); err != nil {
			return err
		}
	} else if b.client, err = b.node.AddPod(ctx, measuredNamespace, "client", clientSlot); err != nil {
		return err
	}
	for _, p := range b.backends {
		r, err := b.loadgenRun(ctx, 0, 20*time.Second, "", "first", "--targets", target(p.IPv4, backendPort), "--timeout", "10s")
		if err != nil || r.FirstOKUnixNano == 0 {
			return fmt.Errorf("server in %s not answering: %v %+v", p.Name, err, r)
		}
	}
	return b.createMeasured(ctx, backendNode)
}

// externalClient makes the NodePort scenario's client: a host on the LAN, outside the cluster,
// whose route to the backends' pod CIDR (the direct path) goes straight to their node. The LAN
// is made to behave like a wire for every path alike: TX checksum offload off on the LAN
// devices, so every frame carries complete checksums as a NIC delivers them (a veth would pass
// on CHECKSUM_PARTIAL frames that XDP has to leave to tc), and node1's bridge port takes what
// an XDP program on node1 sends with XDP_TX (sandbox Node.AcceptXDPTx).
func (b *bench) externalClient(ctx context.Context, backendNode *sandbox.Node) (*sandbox.Host, error) {
	h, err := b.cp.AddExternalHost(ctx, "client", 0)
	if err != nil {
		return nil, err
	}
	v4, _ := sandbox.NodePodCIDRs(backendNode.Index)
	if err := h.RouteVia(ctx, v4, backendNode); err != nil {
		return nil, err
	}
	for _, set := range []func() error{
		func() error { return h.SetLANOffload(sandbox.TxChecksum, false) },
		func() error { return b.node.SetLANOffload(sandbox.TxChecksum, false) },
		func() error { return backendNode.SetLANOffload(sandbox.TxChecksum, false) },
		func() error { return b.node.AcceptXDPTx(true) },
	} {
		if err := set(); err != nil {
			return nil, err
		}
	}
	return h, nil
}

// noTimeWait makes a backend pod keep no TIME_WAIT sockets (net.ipv4.tcp_max_tw_buckets=0,
// in the pod's own namespace). The servers close first, so they would hold one per recent
// connection for a minute; a new connection from a reused client port meets it and is only
// accepted if its timestamp is newer. Linux derives the client's timestamp offset from the
// address it connects to: the ClusterIP for kube-proxy, the pod's for kpr and direct. So a
// kube-proxy connection reusing a port that a kpr or direct one used a few seconds earlier is
// refused and waits a second for its SYN to be sent again, which would make the paths depend
// on the order they run in.
func noTimeWait(ctx context.Context, p *sandbox.Pod) error {
	const key = "net.ipv4.tcp_max_tw_buckets"
	if out, err := p.Exec(ctx, 0, "sysctl", "-q", "-w", key+"=0"); err != nil {
		return fmt.Errorf("%s in %s: %w: %s", key, p.NS, err, out)
	}
	out, err := p.Exec(ctx, 0, "sysctl", "-n", key)
	if err != nil || strings.TrimSpace(string(out)) != "0" {
		return fmt.Errorf("%s in %s is %q (%v), want 0", key, p.NS, out, err)
	}
	return nil
}

// netnsInodes identifies the sandbox's network namespaces.
func (b *bench) netnsInodes() map[uint64]bool {
	out := map[uint64]bool{}
	for _, ns := range b.cp.Namespaces() {
		var st unix.Stat_t
		if unix.Stat(filepath.Join("/run/netns", ns), &st) == nil {
			out[st.Ino] = true
		}
	}
	return out
}

func (b *bench) wantsKubeProxy() bool {
	return slices.Contains(b.cfg.Paths, KubeProxyNFTables) || slices.Contains(b.cfg.Paths, KubeProxyIPTables)
}

// close stops kpr and removes its datapath, then the whole sandbox.
func (b *bench) close() error {
	var errs []error
	if b.bpfStats != nil {
		b.bpfStats.Close()
	}
	if b.kpr != nil {
		if err := b.kpr.Close(); err != nil {
			errs = append(errs, fmt.Errorf("kpr: %w", err))
		}
	}
	if b.cp != nil {
		b.log("removing the sandbox")
		if err := b.cp.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// runScale runs every path once per round, rotating the order each round.
func (b *bench) runScale(ctx context.Context, sr *ScaleResult) error {
	results := map[Path]*PathResult{}
	for _, p := range b.cfg.Paths {
		pr := &PathResult{Path: p}
		results[p] = pr
		sr.Paths = append(sr.Paths, pr)
	}
	for round := range b.cfg.Rounds {
		order := rotate(b.cfg.Paths, round)
		for i, p := range order {
			pr := results[p]
			if pr.Skipped != "" {
				continue
			}
			b.log("%s %s, round %d/%d: %s", fmtCount(sr.Services), plural(sr.Services, "Service", "Services"), round+1, b.cfg.Rounds, p)
			run := &PathRun{Path: p, Round: round + 1, Position: i + 1, Load1: load1(), ForeignNetns: foreignNetns(b.cfg.Prefix)}
			pr.Runs = append(pr.Runs, run)
			err := b.runPath(ctx, sr.Services, p, run)
			b.log("  %s", run.oneLine())
			if err != nil {
				run.Err = err.Error()
				return fmt.Errorf("%s %s, %s: %w", fmtCount(sr.Services), plural(sr.Services, "Service", "Services"), p, err)
			}
			if run.HasFirstAnswer && !run.Answered {
				pr.Skipped = fmt.Sprintf("did not answer within %s in round %d; not retried", fmtDuration(run.FirstAnswerLimit), round+1)
			}
			if err := ctx.Err(); err != nil {
				return err
			}
		}
	}
	return nil
}

func rotate[T any](s []T, n int) []T {
	if len(s) == 0 {
		return nil
	}
	n %= len(s)
	return append(slices.Clone(s[n:]), s[:n]...)
}

// runPath measures one path once. An error means the node could not be brought back to a
// clean state (or ctx ended): the run stops, since later paths would be contaminated.
func (b *bench) runPath(ctx context.Context, services int, p Path, run *PathRun) error {
	if err := b.checkClean(ctx); err != nil {
		return fmt.Errorf("before %s: %w", p, err)
	}
	switch p {
	case Direct:
		return b.measure(ctx, Direct, b.plain.FD, b.podTargets(), run)
	case Kpr, KprTC, KprXDP:
		return b.runKpr(ctx, run)
	case KubeProxyNFTables:
		return b.runKubeProxy(ctx, "nftables", run)
	case KubeProxyIPTables:
		return b.runKubeProxy(ctx, "iptables", run)
	}
	return fmt.Errorf("unknown path %q", p)
}

// podTargets are the backend pods' own addresses, which the direct path connects to in turn.
func (b *bench) podTargets() []string {
	var targets []string
	for _, pod := range b.backends {
		targets = append(targets, target(pod.IPv4, backendPort))
	}
	return targets
}

func target(a netip.Addr, port int) string {
	return netip.AddrPortFrom(a, uint16(port)).String()
}
