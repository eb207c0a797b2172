package bpf

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// BenchmarkConnectedSocket measures what kpr's socket programs add to the life of a
// connected socket: socket(), connect(), getpeername() and close(), in three cases:
//   - "vip": to a VIP, translated, its reverse translation recorded and read back;
//   - "backend", after the VIP case: straight to a backend; connect4 and getpeername4 run and
//     find nothing (a backend's port is one translated sockets have, so getpeername4 looks
//     for the socket's entry);
//   - "other": to a port no backend has; getpeername4 stops at the port mark.
//
// A UDP socket sends nothing; a TCP one makes its handshake with a server in the test's
// namespace and closes with a reset (no TIME_WAIT). The VIP cases first make as many sockets
// as the default maps hold, so that a TCP socket's slot in kpr_sk_conn_v1 has been used
// before, as on a busy node. Besides ns/op it reports connect4's, getpeername4's and
// sock_release's run time per call from the kernel's statistics (on for the run; they add two
// clock reads to every program run).
//
//	go test -run '^$' -bench ConnectedSocket -benchtime 100000x ./bpf/
func BenchmarkConnectedSocket(b *testing.B) {
	e := newTestEnv(b)
	cfg := e.config()
	cfg.SockRevNatMapSize = DefaultSockRevNatMapSize
	cfg.SockConnMapSize = DefaultSockConnMapSize
	d := e.loadConfig(cfg)
	startAllServers(e)
	programServices(b, d.Maps)
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		b.Skipf("BPF run-time statistics: %v", err)
	}
	b.Cleanup(func() { stats.Close() })

	loop := func(sotype int, dst netip.AddrPort, n int) error {
		return e.do(func() error {
			sa := sockaddr(dst, unix.AF_INET)
			for range n {
				fd, err := unix.Socket(unix.AF_INET, sotype|unix.SOCK_CLOEXEC, 0)
				if err != nil {
					return err
				}
				if sotype == unix.SOCK_STREAM {
					if err := unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1}); err != nil {
						unix.Close(fd)
						return err
					}
				}
				if err := unix.Connect(fd, sa); err != nil {
					unix.Close(fd)
					return err
				}
				if _, err := unix.Getpeername(fd); err != nil {
					unix.Close(fd)
					return err
				}
				unix.Close(fd)
			}
			return nil
		})
	}
	for _, c := range []struct {
		name   string
		sotype int
		dst    netip.AddrPort
		fill   int
	}{
		{"udp/other", unix.SOCK_DGRAM, netip.AddrPortFrom(udpA.Addr(), 9), 0},
		{"udp/vip", unix.SOCK_DGRAM, netip.AddrPortFrom(vip4, 53), DefaultSockRevNatMapSize},
		{"udp/backend", unix.SOCK_DGRAM, udpA, 0},
		{"tcp/vip", unix.SOCK_STREAM, netip.AddrPortFrom(vip4, 80), DefaultSockRevNatMapSize},
		{"tcp/backend", unix.SOCK_STREAM, tcpA, 0},
	} {
		b.Run(c.name, func(b *testing.B) {
			if err := loop(c.sotype, c.dst, c.fill); err != nil {
				b.Fatal(err)
			}
			before, err := RunStats(e.pinDir)
			if err != nil {
				b.Fatal(err)
			}
			b.ResetTimer()
			if err := loop(c.sotype, c.dst, b.N); err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			after, err := RunStats(e.pinDir)
			if err != nil {
				b.Fatal(err)
			}
			for _, p := range []string{sockProgConnect4, sockProgGetpeername4, sockProgSockRelease} {
				runs := after[p].RunCount - before[p].RunCount
				if runs == 0 {
					b.Fatalf("%s did not run", p)
				}
				ns := float64(after[p].Runtime-before[p].Runtime) / float64(runs)
				b.ReportMetric(ns, fmt.Sprintf("%s-ns/run", p))
			}
		})
	}
}
