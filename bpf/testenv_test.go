package bpf

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Addresses exist only inside the test's network namespace (see
// docs/ARCHITECTURE.md, "Test addressing"). VIPs are only map entries.
var (
	backendA  = netip.MustParseAddr("10.244.1.2")
	backendB  = netip.MustParseAddr("10.244.1.3")
	backend6  = netip.MustParseAddr("fd6b:7072:244:1::2")
	vip4      = netip.MustParseAddr("10.96.0.10")
	vip4Other = netip.MustParseAddr("10.96.0.11")
	vip6      = netip.MustParseAddr("fd6b:7072:96::a")
)

// testEnv is a private world for one test: a child cgroup that the test
// process sits in for the test's duration, a fresh bpffs, and a network
// namespace with the backend addresses on lo. Everything is undone in
// t.Cleanup, also when the test fails.
type testEnv struct {
	t      testing.TB
	cgroup string
	bpffs  string
	pinDir string
	netns  *os.File
}

func randomSuffix(t testing.TB) string {
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (BPF, cgroups, namespaces)")
	}
}

func newTestEnv(t testing.TB) *testEnv {
	t.Helper()
	requireRoot(t)
	e := &testEnv{t: t}
	e.bpffs = mountBPFFS(t)
	e.pinDir = filepath.Join(e.bpffs, "kpr")
	e.cgroup = makeCgroup(t)
	e.netns = makeNetns(t)
	e.ip("link", "set", "lo", "up")
	e.ip("addr", "add", backendA.String()+"/32", "dev", "lo")
	e.ip("addr", "add", backendB.String()+"/32", "dev", "lo")
	e.ip("-6", "addr", "add", backend6.String()+"/128", "dev", "lo", "nodad")
	enterCgroup(t, e.cgroup)
	return e
}

// mountBPFFS mounts a bpffs of our own; /sys/fs/bpf is left alone.
func mountBPFFS(t testing.TB) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "bpffs")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		t.Fatalf("mount bpffs on %s: %v", dir, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, 0); err != nil {
			t.Errorf("unmount %s: %v (detaching lazily)", dir, err)
			_ = unix.Unmount(dir, unix.MNT_DETACH)
		}
	})
	return dir
}

// makeCgroup creates kpr-test-<random> directly below the cgroup2 mount.
func makeCgroup(t testing.TB) string {
	t.Helper()
	mnt, err := CgroupV2Mount()
	if err != nil {
		t.Skipf("no cgroup2: %v", err)
	}
	dir := filepath.Join(mnt, "kpr-test-"+randomSuffix(t))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatalf("create test cgroup: %v", err)
	}
	t.Cleanup(func() {
		// The kernel may take a moment to see the cgroup empty after the
		// process moved out; retry briefly.
		var err error
		for range 100 {
			if err = os.Remove(dir); err == nil || errors.Is(err, os.ErrNotExist) {
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Errorf("remove test cgroup %s: %v", dir, err)
	})
	return dir
}

// enterCgroup moves the whole test process into cg (sockets take the cgroup
// of their creator) and back to its original cgroup at cleanup.
func enterCgroup(t testing.TB, cg string) {
	t.Helper()
	mnt, err := CgroupV2Mount()
	if err != nil {
		t.Fatal(err)
	}
	self, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	orig := ""
	for line := range strings.SplitSeq(string(self), "\n") {
		if rest, ok := strings.CutPrefix(line, "0::"); ok {
			orig = filepath.Join(mnt, rest)
		}
	}
	if orig == "" {
		t.Fatalf("no cgroup v2 entry in /proc/self/cgroup:\n%s", self)
	}
	pid := []byte(strconv.Itoa(os.Getpid()))
	if err := os.WriteFile(filepath.Join(cg, "cgroup.procs"), pid, 0); err != nil {
		t.Fatalf("enter test cgroup: %v", err)
	}
	t.Cleanup(func() {
		if err := os.WriteFile(filepath.Join(orig, "cgroup.procs"), pid, 0); err != nil {
			t.Errorf("return to cgroup %s: %v", orig, err)
		}
	})
}

// makeNetns creates a network namespace on a throwaway thread and keeps only
// a file descriptor to it; the namespace goes away with the last socket.
func makeNetns(t testing.TB) *os.File {
	t.Helper()
	type result struct {
		f   *os.File
		err error
	}
	ch := make(chan result, 1)
	go func() {
		// Never unlocked: the thread dies with this goroutine instead of
		// going back to the scheduler in the wrong namespace.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			ch <- result{err: fmt.Errorf("unshare netns: %w", err)}
			return
		}
		f, err := os.Open(fmt.Sprintf("/proc/%d/task/%d/ns/net", os.Getpid(), unix.Gettid()))
		ch <- result{f, err}
	}()
	r := <-ch
	if r.err != nil {
		t.Fatal(r.err)
	}
	t.Cleanup(func() { r.f.Close() })
	return r.f
}

// ip runs ip(8) in the test namespace. nsenter switches only the network
// namespace; `ip netns exec` would remount /sys and hide our mounts.
func (e *testEnv) ip(args ...string) {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	nsPath := fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), e.netns.Fd())
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + nsPath, "ip"}, args...)...)
	if out, err := cmd.CombinedOutput(); err != nil {
		e.t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// do runs fn on a fresh OS thread inside the test namespace. Sockets fn
// creates stay in the namespace and may be used from any goroutine.
func (e *testEnv) do(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked, see makeNetns
		if err := unix.Setns(int(e.netns.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns: %w", err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

func (e *testEnv) config() Config {
	return Config{
		PinDir:               e.pinDir,
		CgroupPath:           e.cgroup,
		ServiceMapSize:       1024,
		BackendMapSize:       1024,
		RevNatMapSize:        256,
		SockRevNatMapSize:    1024,
		SockConnMapSize:      1024,
		AffinityMapSize:      256,
		AffinityMatchMapSize: 256,
	}
}

// load loads the datapath and removes it (pins, links) at cleanup.
func (e *testEnv) load() *Datapath {
	e.t.Helper()
	return e.loadConfig(e.config())
}

// loadConfig is load with a config of the test's own (e.config(), changed).
func (e *testEnv) loadConfig(cfg Config) *Datapath {
	e.t.Helper()
	d, err := Load(cfg)
	if err != nil {
		e.t.Fatalf("Load: %v", err)
	}
	e.t.Cleanup(func() {
		d.Close()
		if err := Cleanup(e.pinDir); err != nil {
			e.t.Errorf("Cleanup: %v", err)
		}
	})
	return d
}

// startServers runs a TCP and a UDP server on every addrPort inside the
// namespace. Each answers with "backend=<its address> peer=<client>".
func (e *testEnv) startServers(tcp, udp []netip.AddrPort) {
	e.t.Helper()
	var wg sync.WaitGroup
	var closers []func() error
	err := e.do(func() error {
		for _, ap := range tcp {
			ln, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(ap))
			if err != nil {
				return err
			}
			closers = append(closers, ln.Close)
			wg.Go(func() { serveTCP(ln, ap) })
		}
		for _, ap := range udp {
			c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(ap))
			if err != nil {
				return err
			}
			closers = append(closers, c.Close)
			wg.Go(func() { serveUDP(c, ap) })
		}
		return nil
	})
	e.t.Cleanup(func() {
		for _, c := range closers {
			c()
		}
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			e.t.Errorf("servers did not stop")
		}
	})
	if err != nil {
		e.t.Fatalf("start servers: %v", err)
	}
}

func serveTCP(ln *net.TCPListener, self netip.AddrPort) {
	for {
		c, err := ln.AcceptTCP()
		if err != nil {
			return // listener closed
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		fmt.Fprintf(c, "backend=%s peer=%s\n", self, c.RemoteAddr())
		c.Close()
	}
}

func serveUDP(c *net.UDPConn, self netip.AddrPort) {
	buf := make([]byte, 1500)
	for {
		n, from, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			return // conn closed
		}
		reply := fmt.Sprintf("backend=%s peer=%s msg=%s\n", self, from, buf[:n])
		c.WriteToUDPAddrPort([]byte(reply), from)
	}
}

// backendOf extracts the backend from a server reply.
func backendOf(reply string) string {
	f, _, _ := strings.Cut(strings.TrimSpace(reply), " ")
	return strings.TrimPrefix(f, "backend=")
}

func sockaddr(ap netip.AddrPort, family int) unix.Sockaddr {
	if family == unix.AF_INET {
		return &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}
	}
	return &unix.SockaddrInet6{Addr: ap.Addr().As16(), Port: int(ap.Port())}
}

func addrPortOf(sa unix.Sockaddr) netip.AddrPort {
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(sa.Port))
	}
	return netip.AddrPort{}
}

func familyOf(ap netip.AddrPort) int {
	if ap.Addr().Is4() {
		return unix.AF_INET
	}
	return unix.AF_INET6
}

// socket makes a blocking socket whose every call gives up after a second.
func socket(family, sotype int) (int, error) {
	fd, err := unix.Socket(family, sotype|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	tv := unix.Timeval{Sec: 1}
	for _, opt := range []int{unix.SO_RCVTIMEO, unix.SO_SNDTIMEO} {
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, opt, &tv); err != nil {
			unix.Close(fd)
			return -1, err
		}
	}
	return fd, nil
}

// exchange is what a client saw: who answered, and the address the socket
// reported for its peer (getpeername, or recvfrom's source for UDP).
type exchange struct {
	backend string
	peer    netip.AddrPort
	from    netip.AddrPort
}

// dialTCP connects to dst from a socket of the given family (AF_INET6 with a
// v4-mapped dst exercises connect6 with an IPv4 VIP).
func (e *testEnv) dialTCP(family int, dst netip.AddrPort) (exchange, error) {
	var ex exchange
	err := e.do(func() error {
		fd, err := socket(family, unix.SOCK_STREAM)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		if err := unix.Connect(fd, sockaddr(dst, family)); err != nil {
			return err
		}
		peer, err := unix.Getpeername(fd)
		if err != nil {
			return fmt.Errorf("getpeername: %w", err)
		}
		ex.peer = addrPortOf(peer)
		var reply []byte
		buf := make([]byte, 512)
		for range 16 { // the server sends one short line and closes
			n, err := unix.Read(fd, buf)
			if err != nil {
				return fmt.Errorf("read reply: %w", err)
			}
			reply = append(reply, buf[:n]...)
			if n == 0 || bytes.IndexByte(reply, '\n') >= 0 {
				break
			}
		}
		ex.backend = backendOf(string(reply))
		return nil
	})
	return ex, err
}

// udpConnected connects a UDP socket to dst, sends and receives one datagram.
func (e *testEnv) udpConnected(family int, dst netip.AddrPort) (exchange, error) {
	var ex exchange
	err := e.do(func() error {
		fd, err := socket(family, unix.SOCK_DGRAM)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		if err := unix.Connect(fd, sockaddr(dst, family)); err != nil {
			return err
		}
		peer, err := unix.Getpeername(fd)
		if err != nil {
			return fmt.Errorf("getpeername: %w", err)
		}
		ex.peer = addrPortOf(peer)
		if _, err := unix.Write(fd, []byte("connected")); err != nil {
			return fmt.Errorf("send: %w", err)
		}
		buf := make([]byte, 1500)
		n, from, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			return fmt.Errorf("recvfrom: %w", err)
		}
		ex.from = addrPortOf(from)
		ex.backend = backendOf(string(buf[:n]))
		return nil
	})
	return ex, err
}

// udpUnconnected sends with sendto and reads the answer with recvfrom.
func (e *testEnv) udpUnconnected(family int, dst netip.AddrPort) (exchange, error) {
	var ex exchange
	err := e.do(func() error {
		fd, err := socket(family, unix.SOCK_DGRAM)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		if err := unix.Sendto(fd, []byte("unconnected"), 0, sockaddr(dst, family)); err != nil {
			return err
		}
		buf := make([]byte, 1500)
		n, from, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			return fmt.Errorf("recvfrom: %w", err)
		}
		ex.from = addrPortOf(from)
		ex.backend = backendOf(string(buf[:n]))
		return nil
	})
	return ex, err
}
