package bpf

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// TestConnectedPeerKeptWithTheSocket: a connected UDP socket's VIP is kept until the socket
// is released (its slot of kpr_sk_conn_v1), so however many other sockets come and go,
// getpeername() and recvfrom() of a long-lived connection keep showing the VIP; before,
// its entry was one of an LRU map's and a burst of short connections pushed it out. Closed
// sockets give their slots back. A socket connected again, to an address that is no VIP,
// shows that address.
func TestConnectedPeerKeptWithTheSocket(t *testing.T) {
	e := newTestEnv(t)
	cfg := e.config()
	cfg.SockRevNatMapSize = 16 // the LRU map that unconnected sockets still use
	d := e.loadConfig(cfg)
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
	if p, from := connectedPeer(t, fd); p != vipUDP || from != vipUDP {
		t.Fatalf("getpeername = %s, recvfrom source = %s, want the VIP %s", p, from, vipUDP)
	}

	// 64 short TCP connections, 64 unconnected and 64 connected UDP exchanges: four times the
	// LRU map, and each closed.
	for i := range 64 {
		ex, err := e.dialTCP(unix.AF_INET, netip.AddrPortFrom(vip4, 80))
		if err != nil {
			t.Fatalf("TCP connection %d: %v", i, err)
		}
		if ex.peer != netip.AddrPortFrom(vip4, 80) {
			t.Fatalf("TCP connection %d: getpeername = %s, want the VIP", i, ex.peer)
		}
		udpFromVIP(t, i, e.udpUnconnected, vipUDP)
		udpFromVIP(t, i, e.udpConnected, vipUDP)
	}
	if p, from := connectedPeer(t, fd); p != vipUDP || from != vipUDP {
		t.Fatalf("after 192 other sockets: getpeername = %s, recvfrom source = %s, want the VIP %s", p, from, vipUDP)
	}
	if n := takenSlots(t, d.Maps); n != 1 {
		t.Fatalf("%d slots of %s taken with one socket alive: closed sockets keep theirs", n, sockMapKprSkConnV1)
	}

	// Connected again, straight to each backend (one of them is the one it was translated
	// to): that backend is the peer now, not the VIP.
	for _, be := range []netip.AddrPort{udpA, udpB} {
		must(t, e.do(func() error { return unix.Connect(fd, sockaddr(be, unix.AF_INET)) }))
		if p, from := connectedPeer(t, fd); p != be || from != be {
			t.Fatalf("connected to %s itself: getpeername = %s, recvfrom source = %s, want %s", be, p, from, be)
		}
	}
}

// TestConnectedUDPPeerWhenItsSlotIsTaken: a UDP socket connected to a VIP whose slot of
// kpr_sk_conn_v1 another live socket holds keeps its reverse translation in its own storage
// (kpr_sk_peer_v1), not in the LRU map, where other sockets' traffic would push it out; and it
// still drops it when it connects elsewhere.
func TestConnectedUDPPeerWhenItsSlotIsTaken(t *testing.T) {
	e := newTestEnv(t)
	cfg := e.config()
	cfg.SockConnMapSize = 1 // one slot: the first socket takes it
	cfg.SockRevNatMapSize = 16
	d := e.loadConfig(cfg)
	startAllServers(e)
	programServices(t, d.Maps)
	vipTCP, vipUDP := netip.AddrPortFrom(vip4, 80), netip.AddrPortFrom(vip4, 53)

	var holder, fd int
	must(t, e.do(func() error {
		var err error
		if holder, err = socket(unix.AF_INET, unix.SOCK_STREAM); err != nil {
			return err
		}
		if err := unix.Connect(holder, sockaddr(vipTCP, unix.AF_INET)); err != nil {
			return err
		}
		if fd, err = socket(unix.AF_INET, unix.SOCK_DGRAM); err != nil {
			return err
		}
		return unix.Connect(fd, sockaddr(vipUDP, unix.AF_INET))
	}))
	defer unix.Close(holder)
	defer unix.Close(fd)
	if n := takenSlots(t, d.Maps); n != 1 {
		t.Fatalf("%d slots taken, want the one", n)
	}

	// Unconnected UDP exchanges: four times the LRU map.
	for i := range 64 {
		udpFromVIP(t, i, e.udpUnconnected, vipUDP)
	}
	if p, from := connectedPeer(t, fd); p != vipUDP || from != vipUDP {
		t.Fatalf("after 64 other sockets: getpeername = %s, recvfrom source = %s, want the VIP %s", p, from, vipUDP)
	}
	sa, err := unix.Getpeername(holder)
	must(t, err)
	if p := addrPortOf(sa); p != vipTCP {
		t.Fatalf("the slot's TCP socket: getpeername = %s, want the VIP %s", p, vipTCP)
	}

	must(t, e.do(func() error { return unix.Connect(fd, sockaddr(udpA, unix.AF_INET)) }))
	if p, from := connectedPeer(t, fd); p != udpA || from != udpA {
		t.Fatalf("connected to %s itself: getpeername = %s, recvfrom source = %s, want %s", udpA, p, from, udpA)
	}
}

// TestTCPPeerKeptWhileSocketsComeAndGo: a TCP socket connected to a VIP keeps its reverse
// translation in a slot of kpr_sk_conn_v1 until it is released, whether its connection
// succeeded or was refused; then the slot is free for later sockets. A long-lived socket
// keeps showing the VIP however many sockets came and went (before, its entry was an LRU
// map's, where the newest sockets push out the oldest), and so do sockets whose slot is
// taken, from the LRU map.
func TestTCPPeerKeptWhileSocketsComeAndGo(t *testing.T) {
	const slots, alive = 8, 12
	e := newTestEnv(t)
	cfg := e.config()
	cfg.SockConnMapSize = slots
	// The LRU map keeps the sockets whose slot is taken: e.config()'s 1024 entries, far more
	// than them, since an LRU map this small evicts before it is full (its free nodes sit on
	// per-CPU lists).
	d := e.loadConfig(cfg)
	startAllServers(e)
	programServices(t, d.Maps)
	// A VIP whose backend has no listener: connect() is refused by the backend.
	const svcRefused, beRefused = 6, 7
	keyRefused := ServiceKey{Addr: vip4, Port: 81, Proto: ProtoTCP}
	must(t, d.Maps.UpsertBackend(beRefused, Backend{tcpA.Addr(), 9, ProtoTCP}))
	must(t, d.Maps.UpsertService(keyRefused, Service{ID: svcRefused, Backends: []uint32{beRefused}}, 0))
	must(t, d.Maps.UpsertRevNat(svcRefused, RevNat{Addr: vip4, Port: 81}))
	vip := netip.AddrPortFrom(vip4, 80)

	var fds []int
	t.Cleanup(func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	})
	open := func() {
		t.Helper()
		must(t, e.do(func() error {
			fd, err := socket(unix.AF_INET, unix.SOCK_STREAM)
			if err != nil {
				return err
			}
			fds = append(fds, fd)
			return unix.Connect(fd, sockaddr(vip, unix.AF_INET))
		}))
	}
	peers := func(when string) {
		t.Helper()
		for i, fd := range fds {
			sa, err := unix.Getpeername(fd)
			must(t, err)
			if p := addrPortOf(sa); p != vip {
				t.Errorf("%s: socket %d of %d alive: getpeername = %s, want the VIP %s", when, i+1, len(fds), p, vip)
			}
		}
	}
	open() // the long-lived one

	// Four times as many connections as there are slots, and as many refused ones, each
	// closed.
	for i := range 4 * slots {
		ex, err := e.dialTCP(unix.AF_INET, vip)
		if err != nil {
			t.Fatalf("TCP connection %d: %v", i, err)
		}
		if ex.peer != vip {
			t.Fatalf("TCP connection %d: getpeername = %s, want the VIP %s", i, ex.peer, vip)
		}
		err = e.do(func() error {
			fd, err := socket(unix.AF_INET, unix.SOCK_STREAM)
			if err != nil {
				return err
			}
			defer unix.Close(fd)
			return unix.Connect(fd, sockaddr(netip.AddrPortFrom(vip4, 81), unix.AF_INET))
		})
		wantErrno(t, fmt.Sprintf("connect %d to a VIP whose backend has no listener", i), err, unix.ECONNREFUSED)
	}
	peers("after 64 other sockets")
	if n := takenSlots(t, d.Maps); n != 1 {
		t.Fatalf("%d slots of %s taken with one socket alive: closed sockets keep theirs", n, sockMapKprSkConnV1)
	}

	for len(fds) < alive {
		open()
	}
	peers("more sockets alive than slots")
}

// udpFromVIP makes UDP exchange i with do (a connected or an unconnected socket) and fails
// unless the answer's source is the VIP.
func udpFromVIP(t *testing.T, i int, do func(int, netip.AddrPort) (exchange, error), vip netip.AddrPort) {
	t.Helper()
	ex, err := do(unix.AF_INET, vip)
	if err != nil {
		t.Fatalf("UDP exchange %d: %v", i, err)
	}
	if ex.from != vip {
		t.Fatalf("UDP exchange %d: recvfrom source = %s, want the VIP", i, ex.from)
	}
}

// connectedPeer is what the connected UDP socket fd reports as its peer: getpeername(), and
// the source recvfrom() gives for the answer to a datagram it sends.
func connectedPeer(t *testing.T, fd int) (peer, source netip.AddrPort) {
	t.Helper()
	sa, err := unix.Getpeername(fd)
	must(t, err)
	if _, err := unix.Write(fd, []byte("connected")); err != nil {
		t.Fatalf("send: %v", err)
	}
	buf := make([]byte, 1500)
	_, from, err := unix.Recvfrom(fd, buf, 0)
	if err != nil {
		t.Fatalf("recvfrom: %v", err)
	}
	return addrPortOf(sa), addrPortOf(from)
}

// takenSlots counts the slots of kpr_sk_conn_v1 that hold a socket's cookie.
func takenSlots(t *testing.T, m *LBMaps) int {
	t.Helper()
	taken, _, err := m.SocketSlots()
	must(t, err)
	return taken
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

	// The older kpr kept a TCP socket's entry in kpr_sk_revnat_v1, keyed by cookie and
	// backend, and had no port map: the entry moves, the port map's pin goes, and the
	// programs are loaded again.
	var (
		slot uint32
		c    sockSkConn
	)
	it := d.Maps.sockConn.Iterate()
	for it.Next(&slot, &c) && c.Cookie == 0 {
	}
	if c.Cookie == 0 {
		t.Fatalf("no slot of %s taken after connect(): %v", sockMapKprSkConnV1, it.Err())
	}
	must(t, d.Maps.sockConn.Put(slot, sockSkConn{}))
	p := c.Peer
	must(t, d.Maps.sockRevNat.Put(sockSkRevnatKey{Cookie: c.Cookie, Addr: p.BeAddr, Port: p.BePort},
		sockSkRevnatValue{Addr: p.VipAddr, Port: p.VipPort, SvcId: p.SvcId}))
	d.Close()
	must(t, os.Remove(filepath.Join(e.pinDir, sockMapKprSkRevnatPortsV1)))
	d2, err := Load(e.config())
	if err != nil {
		t.Fatalf("Load over the older pins: %v", err)
	}
	defer d2.Close()
	peer("after the upgrade")
}
