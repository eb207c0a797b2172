package sandbox

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// netnsDir is where iproute2 keeps named network namespaces; nsenter --net takes these paths.
const netnsDir = "/run/netns"

// cmdTimeout bounds every helper command (ip, sysctl, nsenter) whose context has no deadline.
const cmdTimeout = time.Minute

func netnsPath(name string) string { return filepath.Join(netnsDir, name) }

// run runs a short command and folds its output into the error.
func run(ctx context.Context, name string, args ...string) ([]byte, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, cmdTimeout)
		defer cancel()
	}
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return out, nil
}

// ipIn runs one iproute2 command against a namespace (ip -n only affects that ip process).
func ipIn(ctx context.Context, ns string, args ...string) error {
	_, err := run(ctx, "ip", append([]string{"-n", ns}, args...)...)
	return err
}

// ipBatch runs several iproute2 commands against one namespace, stopping at the first failure.
func ipBatch(ctx context.Context, ns string, cmds ...[]string) error {
	for _, c := range cmds {
		if err := ipIn(ctx, ns, c...); err != nil {
			return err
		}
	}
	return nil
}

// addNetns creates a named namespace and pushes its removal onto cs.
func addNetns(ctx context.Context, cs *cleanupStack, name string) error {
	if _, err := os.Stat(netnsPath(name)); err == nil {
		return fmt.Errorf("network namespace %s already exists", name)
	}
	if _, err := run(ctx, "ip", "netns", "add", name); err != nil {
		return err
	}
	cs.push("delete netns "+name, func() error {
		_, err := run(context.Background(), "ip", "netns", "del", name)
		return err
	})
	return nil
}

// setSysctls writes key=value pairs inside a namespace: /proc/sys/net is per namespace, so
// sysctl run under nsenter --net only changes that namespace.
func setSysctls(ctx context.Context, ns string, kv ...string) error {
	args := append([]string{"--net=" + netnsPath(ns), "--", "sysctl", "-q", "-w"}, kv...)
	_, err := run(ctx, "nsenter", args...)
	return err
}

func readSysctl(ctx context.Context, ns, key string) (string, error) {
	out, err := run(ctx, "nsenter", "--net="+netnsPath(ns), "--", "sysctl", "-n", key)
	return strings.TrimSpace(string(out)), err
}

// baseSysctls are set in every sandbox namespace before any interface enters it. IPv4 settings of
// a new namespace are copied from the root namespace, so nothing is left to inheritance: no DAD
// (addresses are usable at once), no reverse-path filter (pod traffic is asymmetric by design).
var baseSysctls = []string{
	"net.ipv6.conf.all.accept_dad=0",
	"net.ipv6.conf.default.accept_dad=0",
	"net.ipv4.conf.all.rp_filter=0",
	"net.ipv4.conf.default.rp_filter=0",
}

// newNamespace creates a namespace with baseSysctls, extra sysctls and lo up.
func newNamespace(ctx context.Context, cs *cleanupStack, name string, extra ...string) error {
	if err := addNetns(ctx, cs, name); err != nil {
		return err
	}
	if err := setSysctls(ctx, name, append(append([]string{}, baseSysctls...), extra...)...); err != nil {
		return err
	}
	return ipIn(ctx, name, "link", "set", "lo", "up")
}

// netnsInode identifies a namespace so leftover processes in it can be found after deletion.
func netnsInode(name string) (uint64, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(netnsPath(name), &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}

// processesInNetns lists the PIDs whose network namespace is one of inodes.
func processesInNetns(inodes map[uint64]string) map[int]string {
	found := map[int]string{}
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return found
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		link, err := os.Readlink(filepath.Join("/proc", e.Name(), "ns", "net"))
		if err != nil {
			continue
		}
		var ino uint64
		if _, err := fmt.Sscanf(link, "net:[%d]", &ino); err != nil {
			continue
		}
		if ns, ok := inodes[ino]; ok {
			found[pid] = ns
		}
	}
	return found
}

// dialInNetns opens a connection from inside a network namespace without a helper process: the
// socket is created on a locked OS thread that has joined the namespace, and a socket stays in
// the namespace it was created in. Only IP literals are accepted, since name resolution would
// run elsewhere.
func dialInNetns(ctx context.Context, nsPath, network, address string) (net.Conn, error) {
	host, _, err := net.SplitHostPort(address)
	if err != nil {
		return nil, err
	}
	if _, err := netip.ParseAddr(host); err != nil {
		return nil, fmt.Errorf("dial %s in %s: only IP literals can be dialed inside a namespace", address, nsPath)
	}
	type result struct {
		conn net.Conn
		err  error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		conn, restored, err := dialOnLockedThread(ctx, nsPath, network, address)
		if restored {
			runtime.UnlockOSThread()
		}
		// Not restored: the goroutine ends still locked, and the runtime ends the thread with it.
		ch <- result{conn, err}
	}()
	r := <-ch
	return r.conn, r.err
}

func dialOnLockedThread(ctx context.Context, nsPath, network, address string) (conn net.Conn, restored bool, err error) {
	restored, err = onLockedThreadIn(nsPath, func() error {
		var d net.Dialer
		var dialErr error
		conn, dialErr = d.DialContext(ctx, network, address)
		return dialErr
	})
	if !restored && conn != nil {
		conn.Close()
		conn = nil
	}
	return conn, restored, err
}

// onLockedThreadIn runs fn on the calling goroutine's OS thread, which the caller has locked,
// after switching that thread into the network namespace at nsPath, then switches back.
// restored is false when switching back failed: the caller must then leave the thread locked,
// so the runtime ends it with the goroutine.
func onLockedThreadIn(nsPath string, fn func() error) (restored bool, err error) {
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		return true, err
	}
	defer orig.Close()
	target, err := os.Open(nsPath)
	if err != nil {
		return true, err
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		return true, fmt.Errorf("setns %s: %w", nsPath, err)
	}
	fnErr := fn()
	if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
		return false, fmt.Errorf("returning from %s: %w", nsPath, err)
	}
	return true, fnErr
}

// inNetns runs fn on a locked OS thread inside the network namespace at nsPath (see
// onLockedThreadIn); for work without a helper process, such as an ioctl on a device.
func inNetns(nsPath string, fn func() error) error {
	ch := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		restored, err := onLockedThreadIn(nsPath, fn)
		if restored {
			runtime.UnlockOSThread()
		}
		ch <- err
	}()
	return <-ch
}
