package bpf

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kpr-dev/kpr/test/ethtool"
)

// TestNodePortTraffic sends real connections through the tc programs, attached in a node
// namespace between a client namespace and a backend namespace:
//
//	client ns: ext0p 198.18.0.100 --- ext0 [node ns: tc_nodeport]  pod0 [tc_nodeport_reply] --- pod0p 10.244.1.2 :backend ns
//
// Both ends capture what they receive (AF_PACKET with PACKET_AUXDATA) and check every
// checksum from scratch. Run with the veths' TX checksum offload on, the kernel hands the
// packets through as CHECKSUM_PARTIAL (the L4 field holds the pseudo-header sum, to be
// completed by whoever transmits them); with it off, as fully checksummed packets that the
// receiving stack verifies. BPF_PROG_RUN can only produce the second kind, so the first is
// tested here.
func TestNodePortTraffic(t *testing.T) {
	e, client, backend := newTrafficEnv(t)
	m := e.d.Maps
	fe := map[string]netip.AddrPort{}
	for i, s := range []struct {
		name  string
		key   ServiceKey
		be    Backend
		proto Proto
	}{
		{"tcp4", ServiceKey{Addr: npNode4, Port: 30080, Proto: ProtoTCP, Scope: ScopeExternal}, Backend{npPodA, 8080, ProtoTCP}, ProtoTCP},
		{"udp4", ServiceKey{Addr: npNode4, Port: 30053, Proto: ProtoUDP, Scope: ScopeExternal}, Backend{npPodA, 5353, ProtoUDP}, ProtoUDP},
		{"tcp6", ServiceKey{Addr: npNode6, Port: 30080, Proto: ProtoTCP, Scope: ScopeExternal}, Backend{npPod6, 8080, ProtoTCP}, ProtoTCP},
		{"udp6", ServiceKey{Addr: npNode6, Port: 30053, Proto: ProtoUDP, Scope: ScopeExternal}, Backend{npPod6, 5353, ProtoUDP}, ProtoUDP},
	} {
		id := uint32(500 + i)
		must(t, m.UpsertBackend(id, s.be))
		must(t, m.UpsertService(s.key, Service{ID: id, Backends: []uint32{id}}, 0))
		fe[s.name] = netip.AddrPortFrom(s.key.Addr, s.key.Port)
		// The same by DSR, one port up: the option goes into the first packets.
		dsrKey := s.key
		dsrKey.Port++
		must(t, m.UpsertService(dsrKey, Service{ID: id + 10, Flags: FlagDSR, Backends: []uint32{id}}, 0))
		fe[s.name+"dsr"] = netip.AddrPortFrom(dsrKey.Addr, dsrKey.Port)
	}

	backend.startServers(
		[]netip.AddrPort{netip.AddrPortFrom(npPodA, 8080), netip.AddrPortFrom(npPod6, 8080)},
		[]netip.AddrPort{netip.AddrPortFrom(npPodA, 5353), netip.AddrPortFrom(npPod6, 5353)})

	for _, offload := range []bool{true, false} {
		t.Run(fmt.Sprintf("tx checksum offload %v", offload), func(t *testing.T) {
			setTxChecksum(t, client, "ext0p", offload)
			setTxChecksum(t, backend, "pod0p", offload)
			toBackend := startCapture(t, backend, "pod0p")
			toClient := startCapture(t, client, "ext0p")

			for _, name := range []string{"tcp4", "tcp6"} {
				peer, err := client.tcpPeer(fe[name])
				if err != nil {
					t.Fatalf("%s to %s: %v", name, fe[name], err)
				}
				checkSNATPeer(t, name, peer)
			}
			for _, name := range []string{"udp4", "udp6"} {
				from, peer, err := client.udpPeer(fe[name])
				if err != nil {
					t.Fatalf("%s to %s: %v", name, fe[name], err)
				}
				if from != fe[name] {
					t.Errorf("%s: answer from %s, want the frontend %s", name, from, fe[name])
				}
				checkSNATPeer(t, name, peer)
			}
			// DSR: the backend sees the client itself.
			for _, name := range []string{"tcp4dsr", "tcp6dsr", "udp4dsr", "udp6dsr"} {
				var peer netip.AddrPort
				var err error
				if strings.HasPrefix(name, "tcp") {
					peer, err = client.tcpPeer(fe[name])
				} else {
					var from netip.AddrPort
					from, peer, err = client.udpPeer(fe[name])
					if err == nil && from != fe[name] {
						t.Errorf("%s: answer from %s, want the frontend %s", name, from, fe[name])
					}
				}
				if err != nil {
					t.Fatalf("%s to %s: %v", name, fe[name], err)
				}
				if want := map[bool]netip.Addr{true: npClient4, false: npClient6}[peer.Addr().Is4()]; peer.Addr() != want {
					t.Errorf("%s: the backend saw the client as %s, want %s", name, peer, want)
				}
			}

			partial, dsrOpts := 0, 0
			for _, c := range []struct {
				cap  *capture
				want func(packet) bool
			}{
				{toBackend, func(p packet) bool { return p.dst.Port() == 8080 || p.dst.Port() == 5353 }},
				{toClient, func(p packet) bool {
					return p.src.Port() >= 30080 && p.src.Port() <= 30081 || p.src.Port() >= 30053 && p.src.Port() <= 30054
				}},
			} {
				n := 0
				for _, cp := range c.cap.stop() {
					// An IPv6 DSR header does not change the L4 checksum: checked without it.
					hdr, data := splitDstOpts(cp.data)
					if hdr != nil {
						dsrOpts++
					}
					if len(cp.data) > ethHdrLen+ipv4Len && cp.data[ethHdrLen] == 0x47 && cp.data[ethHdrLen+ipv4Len] == dsrOpt4Type {
						dsrOpts++
					}
					p, err := parsePacket(data)
					if err != nil || !c.want(p) {
						continue
					}
					n++
					if cp.partial {
						partial++
						if data, err = completePartial(data); err != nil {
							t.Fatal(err)
						}
					}
					if _, errs := checksumErrors(data, false); len(errs) > 0 {
						t.Errorf("%s -> %s (partial %v): %v\n%x", p.src, p.dst, cp.partial, errs, cp.data)
					}
				}
				if n < 4 {
					t.Errorf("captured %d translated packets, want at least 4", n)
				}
			}
			// At least each DSR flow's first packet: 2 SYNs and 2 datagrams.
			if dsrOpts < 4 {
				t.Errorf("%d packets with a DSR option captured, want at least 4", dsrOpts)
			}
			if offload && partial == 0 {
				t.Errorf("no CHECKSUM_PARTIAL packet was seen: the offloaded path went untested")
			}
			if !offload && partial != 0 {
				t.Errorf("%d CHECKSUM_PARTIAL packets with offload off", partial)
			}
		})
	}

	s := e.stats()
	if s.DropError != 0 || s.Forwarded == 0 || s.Replies == 0 {
		t.Errorf("stats %+v", s)
	}
}

// newTrafficEnv is a node namespace with the tc programs attached (tc_nodeport on ext0,
// tc_nodeport_reply on pod0), a client namespace behind ext0 and a backend namespace behind
// pod0, as drawn above TestNodePortTraffic.
func newTrafficEnv(t *testing.T) (e *npEnv, client, backend *testEnv) {
	t.Helper()
	e = newNodePortEnv(t, Config{}, npConfig)
	e.ifindexes()
	client = &testEnv{t: t, netns: makeNetns(t)}
	backend = &testEnv{t: t, netns: makeNetns(t)}
	nsPath := func(env *testEnv) string { return fmt.Sprintf("/proc/%d/fd/%d", unix.Getpid(), env.netns.Fd()) }

	// A netns path has a slash, so ip(8) opens it instead of looking up a name in /run/netns.
	e.ip("link", "set", "ext0p", "netns", nsPath(client))
	e.ip("link", "set", "pod0p", "netns", nsPath(backend))
	client.ip("link", "set", "lo", "up")
	client.ip("link", "set", "ext0p", "address", clientMAC.String(), "up")
	client.ip("addr", "add", npClient4.String()+"/24", "dev", "ext0p")
	client.ip("-6", "addr", "add", npClient6.String()+"/64", "dev", "ext0p", "nodad")
	backend.ip("link", "set", "lo", "up")
	backend.ip("link", "set", "pod0p", "address", podMACs[npPodA].String(), "up")
	backend.ip("addr", "add", npPodA.String()+"/24", "dev", "pod0p")
	backend.ip("-6", "addr", "add", npPod6.String()+"/64", "dev", "pod0p", "nodad")
	backend.ip("route", "add", "default", "via", "10.244.1.1")
	backend.ip("-6", "route", "add", "default", "via", "fd6b:7072:244:1::1")
	must(t, e.do(func() error {
		if err := e.n.AttachTC(e.ext0, TCNodePort); err != nil {
			return err
		}
		return e.n.AttachTC(e.pod0, TCReply)
	}))
	return e, client, backend
}

func checkSNATPeer(t *testing.T, name string, peer netip.AddrPort) {
	t.Helper()
	want := npNode4
	if strings.HasSuffix(name, "6") {
		want = npNode6
	}
	if peer.Addr() != want || peer.Port() < DefaultSNATPorts.First {
		t.Errorf("%s: the backend saw %s, want %s with a port in %s", name, peer, want, DefaultSNATPorts)
	}
}

// peerOf parses the peer from a server line "backend=... peer=<addr:port> ...".
func peerOf(line string) (netip.AddrPort, error) {
	for f := range strings.FieldsSeq(line) {
		if v, ok := strings.CutPrefix(f, "peer="); ok {
			return netip.ParseAddrPort(v)
		}
	}
	return netip.AddrPort{}, fmt.Errorf("no peer in %q", line)
}

// tcpPeer connects to dst and returns the peer the server saw.
func (e *testEnv) tcpPeer(dst netip.AddrPort) (netip.AddrPort, error) {
	var peer netip.AddrPort
	err := e.do(func() error {
		d := net.Dialer{Timeout: 3 * time.Second}
		c, err := d.Dial("tcp", dst.String())
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(3 * time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			return fmt.Errorf("read: %w", err)
		}
		peer, err = peerOf(line)
		return err
	})
	return peer, err
}

// udpPeer sends a datagram to dst from an unconnected socket and returns where the answer
// came from and the peer the server saw.
func (e *testEnv) udpPeer(dst netip.AddrPort) (from, peer netip.AddrPort, err error) {
	err = e.do(func() error {
		c, err := net.ListenUDP("udp", nil)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err := c.WriteToUDPAddrPort([]byte("ping"), dst); err != nil {
			return err
		}
		buf := make([]byte, 1500)
		n, f, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			return fmt.Errorf("read: %w", err)
		}
		from = netip.AddrPortFrom(f.Addr().Unmap(), f.Port())
		peer, err = peerOf(string(buf[:n]))
		return err
	})
	return from, peer, err
}

// setTxChecksum switches a device's TX checksum offload (ethtool -K dev tx on|off) in env's
// namespace.
func setTxChecksum(t *testing.T, env *testEnv, dev string, on bool) {
	t.Helper()
	must(t, env.do(func() error { return ethtool.Set(dev, unix.ETHTOOL_STXCSUM, on) }))
}

type capturedPacket struct {
	data    []byte
	partial bool // TP_STATUS_CSUMNOTREADY: CHECKSUM_PARTIAL
}

// capture collects the packets a device receives.
type capture struct {
	t       *testing.T
	fd      int
	mu      sync.Mutex
	pkts    []capturedPacket
	stopped chan struct{}
	done    chan struct{}
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func startCapture(t *testing.T, env *testEnv, dev string) *capture {
	t.Helper()
	c := &capture{t: t, fd: -1, stopped: make(chan struct{}), done: make(chan struct{})}
	must(t, env.do(func() error {
		ifi, err := net.InterfaceByName(dev)
		if err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
		if err != nil {
			return err
		}
		err = unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index})
		if err == nil {
			err = unix.SetsockoptInt(fd, unix.SOL_PACKET, unix.PACKET_AUXDATA, 1)
		}
		if err == nil {
			err = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 100000})
		}
		if err != nil {
			unix.Close(fd)
			return err
		}
		c.fd = fd
		return nil
	}))
	t.Cleanup(func() { c.stop() })
	go c.loop()
	return c
}

func (c *capture) loop() {
	defer close(c.done)
	buf := make([]byte, 65536)
	oob := make([]byte, 256)
	for {
		n, oobn, _, from, err := unix.Recvmsg(c.fd, buf, oob, 0)
		if err != nil {
			// A timeout: the queue is empty. Only now may a stopped capture end, so
			// that it keeps what arrived before stop.
			select {
			case <-c.stopped:
				return
			default:
				continue
			}
		}
		if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
			continue
		}
		cp := capturedPacket{data: append([]byte(nil), buf[:n]...)}
		msgs, _ := unix.ParseSocketControlMessage(oob[:oobn])
		for _, m := range msgs {
			if m.Header.Level == unix.SOL_PACKET && m.Header.Type == unix.PACKET_AUXDATA && len(m.Data) >= 4 {
				cp.partial = binary.NativeEndian.Uint32(m.Data)&unix.TP_STATUS_CSUMNOTREADY != 0
			}
		}
		c.mu.Lock()
		c.pkts = append(c.pkts, cp)
		c.mu.Unlock()
	}
}

// stop ends the capture and returns what it saw; calling it again returns nil.
func (c *capture) stop() []capturedPacket {
	select {
	case <-c.stopped:
		return nil
	default:
	}
	close(c.stopped)
	<-c.done
	unix.Close(c.fd)
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.pkts
}
