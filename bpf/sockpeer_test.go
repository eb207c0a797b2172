package bpf

import (
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// TestConnectedPeerKeptWithTheSocket: a connected socket's VIP is kept with the socket
// (kpr_sk_peer_v1), so however many other sockets come and go, getpeername() and
// recvfrom() of a long-lived connection keep showing the VIP; before, its entry was one of
// an LRU map's and a burst of short connections pushed it out. A socket connected again,
// to an address that is no VIP, shows that address.
func TestConnectedPeerKeptWithTheSocket(t *testing.T) {
	e := newTestEnv(t)
	cfg := e.config()
	cfg.SockRevNatMapSize = 16 // the LRU map that unconnected sockets still use
	d, err := Load(cfg)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	t.Cleanup(func() {
		d.Close()
		if err := Cleanup(e.pinDir); err != nil {
			t.Errorf("Cleanup: %v", err)
		}
	})
	startAllServers(e)
	programServices(t, d.Maps)
	vipUDP := netip.AddrPortFrom(vip4, 53)

	var fd int
	must(t, e.do(func() error {
		var err error
		fd, err = socket(unix.AF_INET, unix.SOCK_DGRAM)
		if err != nil {
			return err
		}
		return unix.Connect(fd, sockaddr(vipUDP, unix.AF_INET))
	}))
	defer unix.Close(fd)
	peer := func() netip.AddrPort {
		t.Helper()
		sa, err := unix.Getpeername(fd)
		must(t, err)
		return addrPortOf(sa)
	}
	exchange := func() netip.AddrPort {
		t.Helper()
		if _, err := unix.Write(fd, []byte("long-lived")); err != nil {
			t.Fatalf("send: %v", err)
		}
		buf := make([]byte, 1500)
		_, from, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			t.Fatalf("recvfrom: %v", err)
		}
		return addrPortOf(from)
	}
	if p, from := peer(), exchange(); p != vipUDP || from != vipUDP {
		t.Fatalf("getpeername = %s, recvfrom source = %s, want the VIP %s", p, from, vipUDP)
	}

	// 64 short TCP connections and 64 unconnected UDP exchanges: four times the LRU map.
	for i := range 64 {
		ex, err := e.dialTCP(unix.AF_INET, netip.AddrPortFrom(vip4, 80))
		if err != nil {
			t.Fatalf("TCP connection %d: %v", i, err)
		}
		if ex.peer != netip.AddrPortFrom(vip4, 80) {
			t.Fatalf("TCP connection %d: getpeername = %s, want the VIP", i, ex.peer)
		}
		ex, err = e.udpUnconnected(unix.AF_INET, vipUDP)
		if err != nil {
			t.Fatalf("UDP exchange %d: %v", i, err)
		}
		if ex.from != vipUDP {
			t.Fatalf("UDP exchange %d: recvfrom source = %s, want the VIP", i, ex.from)
		}
	}
	if p, from := peer(), exchange(); p != vipUDP || from != vipUDP {
		t.Fatalf("after 128 other sockets: getpeername = %s, recvfrom source = %s, want the VIP %s", p, from, vipUDP)
	}

	// Connected again, straight to a backend: that backend is the peer now, not the VIP.
	must(t, e.do(func() error { return unix.Connect(fd, sockaddr(udpA, unix.AF_INET)) }))
	if p, from := peer(), exchange(); p != udpA || from != udpA {
		t.Fatalf("connected to %s itself: getpeername = %s, recvfrom source = %s, want %s", udpA, p, from, udpA)
	}
}

// TestSockRevNatPortsSeeded: getpeername4 and recvmsg4 look a peer up in kpr_sk_revnat_v1
// only if some entry had its port (kpr_sk_revnat_ports_v1). A kpr that creates the port map
// over an older kpr's pinned entries marks their ports, so sockets translated before the
// upgrade keep showing the VIP.
func TestSockRevNatPortsSeeded(t *testing.T) {
	e := newTestEnv(t)
	d := e.load()
	startAllServers(e)
	programServices(t, d.Maps)
	vip := netip.AddrPortFrom(vip4, 80)

	var fd int
	must(t, e.do(func() error {
		var err error
		fd, err = socket(unix.AF_INET, unix.SOCK_STREAM)
		if err != nil {
			return err
		}
		return unix.Connect(fd, sockaddr(vip, unix.AF_INET))
	}))
	defer unix.Close(fd)
	peer := func(when string) {
		t.Helper()
		sa, err := unix.Getpeername(fd)
		must(t, err)
		if p := addrPortOf(sa); p != vip {
			t.Fatalf("%s: getpeername = %s, want the VIP %s", when, p, vip)
		}
	}
	peer("before")

	// The older kpr had no port map: its pin goes, and the programs are loaded again.
	d.Close()
	must(t, os.Remove(filepath.Join(e.pinDir, sockMapKprSkRevnatPortsV1)))
	d2, err := Load(e.config())
	if err != nil {
		t.Fatalf("Load over the older pins: %v", err)
	}
	defer d2.Close()
	peer("after the upgrade")
}
