package bpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// icmpError builds an ICMP (ICMPv6) error from src to dst quoting the IP header and the first
// 8 bytes after it of the frame quoted (an Ethernet frame); rest is the 4 bytes after the
// checksum (the MTU of frag-needed / packet too big).
func icmpError(src, dst netip.Addr, typ, code byte, rest uint32, quoted []byte) []byte {
	q := quoted[ethHdrLen:]
	qlen := ipv4Len + 8
	if q[0]>>4 == 6 {
		qlen = ipv6Len + 8
	}
	msg := make([]byte, 8, 8+qlen)
	msg[0], msg[1] = typ, code
	binary.BigEndian.PutUint32(msg[4:], rest)
	msg = append(msg, q[:qlen]...)
	var l3 []byte
	if src.Is4() {
		l3 = make([]byte, ipv4Len)
		l3[0] = 0x45
		binary.BigEndian.PutUint16(l3[2:], uint16(ipv4Len+len(msg)))
		l3[8], l3[9] = 64, 1
		s4, d4 := src.As4(), dst.As4()
		copy(l3[12:], s4[:])
		copy(l3[16:], d4[:])
		binary.BigEndian.PutUint16(l3[10:], ^fold(sum(l3)))
		binary.BigEndian.PutUint16(msg[2:], ^fold(sum(msg)))
	} else {
		l3 = make([]byte, ipv6Len)
		l3[0] = 0x60
		binary.BigEndian.PutUint16(l3[4:], uint16(len(msg)))
		l3[6], l3[7] = 58, 64
		s6, d6 := src.As16(), dst.As16()
		copy(l3[8:], s6[:])
		copy(l3[24:], d6[:])
		binary.BigEndian.PutUint16(msg[2:], ^fold(pseudoSum(l3, len(msg))+sum(msg)))
	}
	eth := make([]byte, ethHdrLen)
	copy(eth[0:], quoted[6:12]) // towards whoever sent the quoted packet
	copy(eth[6:], quoted[0:6])
	copy(eth[12:], quoted[12:14])
	return append(append(eth, l3...), msg...)
}

// icmpErrorParts checks an ICMP error frame's outer and ICMP checksums (and the quoted IPv4
// header's) from scratch and returns its outer addresses, type, code, rest and the quoted
// addresses and ports.
func icmpErrorParts(t *testing.T, b []byte) (osrc, odst netip.Addr, typ, code byte, rest uint32, isrc, idst netip.AddrPort) {
	t.Helper()
	l3 := b[ethHdrLen:]
	var msg, q []byte
	if l3[0]>>4 == 4 {
		if s := fold(sum(l3[:ipv4Len])); s != 0xffff {
			t.Errorf("outer IPv4 header checksum: sums to %#04x", s)
		}
		osrc, odst = netip.AddrFrom4([4]byte(l3[12:16])), netip.AddrFrom4([4]byte(l3[16:20]))
		msg = l3[ipv4Len:int(binary.BigEndian.Uint16(l3[2:]))]
		if s := fold(sum(msg)); s != 0xffff {
			t.Errorf("ICMP checksum: sums to %#04x", s)
		}
		q = msg[8:]
		if s := fold(sum(q[:ipv4Len])); s != 0xffff {
			t.Errorf("quoted IPv4 header checksum: sums to %#04x", s)
		}
		isrc = netip.AddrPortFrom(netip.AddrFrom4([4]byte(q[12:16])), binary.BigEndian.Uint16(q[20:]))
		idst = netip.AddrPortFrom(netip.AddrFrom4([4]byte(q[16:20])), binary.BigEndian.Uint16(q[22:]))
	} else {
		osrc, odst = netip.AddrFrom16([16]byte(l3[8:24])), netip.AddrFrom16([16]byte(l3[24:40]))
		msg = l3[ipv6Len : ipv6Len+int(binary.BigEndian.Uint16(l3[4:]))]
		if s := fold(pseudoSum(l3[:ipv6Len], len(msg)) + sum(msg)); s != 0xffff {
			t.Errorf("ICMPv6 checksum: sums to %#04x", s)
		}
		q = msg[8:]
		isrc = netip.AddrPortFrom(netip.AddrFrom16([16]byte(q[8:24])), binary.BigEndian.Uint16(q[40:]))
		idst = netip.AddrPortFrom(netip.AddrFrom16([16]byte(q[24:40])), binary.BigEndian.Uint16(q[42:]))
	}
	return osrc, odst, msg[0], msg[1], binary.BigEndian.Uint32(msg[4:]), isrc, idst
}

// ICMP errors about translated flows reach the other end of the flow translated, so path MTU
// discovery works through a frontend: frag-needed (packet too big) from a router between the
// node and the backend goes to the client, about the client's own packet to the frontend; one
// from a router on the client's side about a reply goes to the backend, about the backend's
// packet to the SNAT address. Errors about unknown flows are left alone.
func TestNodePortICMPErrors(t *testing.T) {
	e := newNodePortEnv(t, Config{}, npConfig)
	e.ifindexes()
	e.programServices()
	router4, router6 := netip.MustParseAddr("10.244.1.254"), netip.MustParseAddr("fd6b:7072:244:1::fe")
	far4, far6 := netip.MustParseAddr("198.18.0.254"), netip.MustParseAddr("fd6b:7072::fe")
	for _, c := range []struct {
		name            string
		client, fe      netip.AddrPort
		proto           Proto
		backends        []netip.AddrPort
		router, far     netip.Addr
		tooBig, tooBig6 byte
	}{
		{"tcp ipv4", netip.AddrPortFrom(npClient4, 47001), netip.AddrPortFrom(npNode4, 30080), ProtoTCP,
			[]netip.AddrPort{netip.AddrPortFrom(npPodA, 8080), netip.AddrPortFrom(npPodB, 8080)}, router4, far4, 3, 4},
		{"udp ipv4", netip.AddrPortFrom(npClient4, 47002), netip.AddrPortFrom(npNode4, 30053), ProtoUDP,
			[]netip.AddrPort{netip.AddrPortFrom(npPodA, 5353)}, router4, far4, 3, 4},
		{"tcp ipv6", netip.AddrPortFrom(npClient6, 47003), netip.AddrPortFrom(npNode6, 30080), ProtoTCP,
			[]netip.AddrPort{netip.AddrPortFrom(npPod6, 8080)}, router6, far6, 2, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			in := buildPacket(pktSpec{src: c.client, dst: c.fe, proto: c.proto, tcpFlags: tcpSYN, payload: []byte("hello")})
			ret, fwd := e.nodeport(in)
			p := translated(t, in, fwd, ret, c.backends...)
			backend, snat := p.dst, p.src

			// A router between node and backend: "too big" about the forwarded packet.
			typ, code := c.tooBig, c.tooBig6
			errIn := icmpError(c.router, snat.Addr(), typ, code, 1400, fwd)
			ret, out := e.reply(errIn)
			if ret != tcActRedirect {
				t.Fatalf("error about the forwarded packet: verdict %d, want TC_ACT_REDIRECT", int32(ret))
			}
			osrc, odst, gtyp, gcode, rest, isrc, idst := icmpErrorParts(t, out)
			if osrc != c.fe.Addr() || odst != c.client.Addr() || isrc != c.client || idst != c.fe {
				t.Errorf("to the client: %s -> %s quoting %s -> %s, want %s -> %s quoting %s -> %s",
					osrc, odst, isrc, idst, c.fe.Addr(), c.client.Addr(), c.client, c.fe)
			}
			if gtyp != typ || gcode != code || rest != 1400 {
				t.Errorf("type %d code %d rest %d changed", gtyp, gcode, rest)
			}
			if len(out) != len(errIn) {
				t.Errorf("length %d, want %d", len(out), len(errIn))
			}

			// The backend's reply goes out; a router on the client's side sends back "too big".
			reply := buildPacket(pktSpec{src: backend, dst: snat, proto: c.proto, tcpFlags: tcpSYN | tcpACK,
				payload: []byte("answer"), srcMAC: podMACs[backend.Addr()], dstMAC: pod0MAC})
			ret, back := e.reply(reply)
			if ret != tcActRedirect {
				t.Fatalf("reply verdict %d", int32(ret))
			}
			errOut := icmpError(c.far, c.fe.Addr(), typ, code, 1280, back)
			ret, out = e.nodeport(errOut)
			if ret != tcActRedirect {
				t.Fatalf("error about the reply: verdict %d, want TC_ACT_REDIRECT", int32(ret))
			}
			osrc, odst, gtyp, gcode, rest, isrc, idst = icmpErrorParts(t, out)
			if osrc != snat.Addr() || odst != backend.Addr() || isrc != backend || idst != snat {
				t.Errorf("to the backend: %s -> %s quoting %s -> %s, want %s -> %s quoting %s -> %s",
					osrc, odst, isrc, idst, snat.Addr(), backend.Addr(), backend, snat)
			}
			if gtyp != typ || gcode != code || rest != 1280 {
				t.Errorf("type %d code %d rest %d changed", gtyp, gcode, rest)
			}
		})
	}

	t.Run("errors about unknown flows pass untouched", func(t *testing.T) {
		other := buildPacket(pktSpec{src: netip.MustParseAddrPort("198.18.0.11:61999"), dst: netip.AddrPortFrom(npPodC, 8080), proto: ProtoTCP, tcpFlags: tcpSYN})
		in := icmpError(router4, npNode4, 3, 4, 1400, other)
		ret, out := e.reply(in)
		untouched(t, "to the node about an unknown flow", in, out, ret)
		ret, out = e.nodeport(in)
		untouched(t, "to the node from outside about an unknown flow", in, out, ret)
	})
	if s := e.stats(); s.ICMPErrors != 6 || s.DropError != 0 {
		t.Errorf("ICMPErrors %d DropError %d, want 6 and 0", s.ICMPErrors, s.DropError)
	}
}

// A packet too big for the route to its backend that may not be fragmented (IPv4 DF, IPv6) is
// answered with fragmentation needed / packet too big from the frontend, with the route's MTU,
// quoting the client's own packet; the stack would have sent it to the SNAT address, the node
// itself. Without DF, or when the packet's checksum is still to be completed by a device, the
// packet is translated and left to the stack as before; packets that fit are forwarded.
func TestNodePortTooBig(t *testing.T) {
	e := newNodePortEnv(t, Config{}, npConfig)
	e.ifindexes()
	e.programServices()
	e.ip("link", "set", "pod0", "mtu", "1280")
	big := make([]byte, 1300)
	for _, c := range []struct {
		name       string
		client, fe netip.AddrPort
		typ, code  byte
		rest       uint32
	}{
		{"udp ipv4 DF", netip.AddrPortFrom(npClient4, 49001), netip.AddrPortFrom(npNode4, 30053), 3, 4, 1280},
		{"udp ipv6", netip.AddrPortFrom(npClient6, 49002), netip.AddrPortFrom(npNode6, 30053), 2, 0, 1280},
		{"tcp ipv4 DF", netip.AddrPortFrom(npClient4, 49003), netip.AddrPortFrom(npNode4, 30080), 3, 4, 1280},
	} {
		t.Run(c.name, func(t *testing.T) {
			proto, flags := ProtoUDP, uint8(0)
			if c.fe.Port() == 30080 {
				proto, flags = ProtoTCP, tcpACK|tcpPSH
			}
			in := buildPacket(pktSpec{src: c.client, dst: c.fe, proto: proto, tcpFlags: flags, payload: big, fragOff: 0x4000})
			ret, out := e.nodeport(in)
			if ret != tcActRedirect {
				t.Fatalf("verdict %d, want TC_ACT_REDIRECT (the error sent back)", int32(ret))
			}
			osrc, odst, typ, code, rest, isrc, idst := icmpErrorParts(t, out)
			if osrc != c.fe.Addr() || odst != c.client.Addr() || isrc != c.client || idst != c.fe {
				t.Errorf("%s -> %s quoting %s -> %s, want %s -> %s quoting the client's packet %s -> %s",
					osrc, odst, isrc, idst, c.fe.Addr(), c.client.Addr(), c.client, c.fe)
			}
			if typ != c.typ || code != c.code || rest != c.rest {
				t.Errorf("type %d code %d MTU field %d, want %d %d %d", typ, code, rest, c.typ, c.code, c.rest)
			}
		})
	}
	t.Run("without DF the stack fragments it", func(t *testing.T) {
		in := buildPacket(pktSpec{src: netip.AddrPortFrom(npClient4, 49010), dst: netip.AddrPortFrom(npNode4, 30053), proto: ProtoUDP, payload: big})
		if ret, _ := e.nodeport(in); ret != tcActOK {
			t.Errorf("verdict %d, want TC_ACT_OK (translated, left to the stack)", int32(ret))
		}
	})
	t.Run("a checksum to be completed by a device: left to the stack", func(t *testing.T) {
		in := buildPacket(pktSpec{src: netip.AddrPortFrom(npClient4, 49011), dst: netip.AddrPortFrom(npNode4, 30053), proto: ProtoUDP, payload: big, fragOff: 0x4000})
		pin, _ := parsePacket(in)
		l4off := len(in) - len(pin.l4)
		binary.BigEndian.PutUint16(in[l4off+6:], fold(pseudoSum(pin.l3, len(pin.l4))))
		if ret, _ := e.nodeport(in); ret != tcActOK {
			t.Errorf("verdict %d, want TC_ACT_OK", int32(ret))
		}
	})
	t.Run("a packet that fits is forwarded", func(t *testing.T) {
		in := buildPacket(pktSpec{src: netip.AddrPortFrom(npClient4, 49012), dst: netip.AddrPortFrom(npNode4, 30053), proto: ProtoUDP, payload: big[:1000], fragOff: 0x4000})
		ret, out := e.nodeport(in)
		translated(t, in, out, ret, netip.AddrPortFrom(npPodA, 5353))
	})
	if s := e.stats(); s.TooBig != 3 {
		t.Errorf("TooBig %d, want 3", s.TooBig)
	}
}

// TestNodePortPathMTUTraffic: a real client sends a datagram too big for the node's route to
// the backend, with path MTU discovery on; the node's answer reaches it, so its kernel learns
// the path MTU to the frontend: the next such send fails with EMSGSIZE, and a datagram that
// fits is answered by the backend.
func TestNodePortPathMTUTraffic(t *testing.T) {
	e, client, backend := newTrafficEnv(t)
	m := e.d.Maps
	for i, s := range []struct {
		key ServiceKey
		be  Backend
	}{
		{ServiceKey{Addr: npNode4, Port: 30053, Proto: ProtoUDP, Scope: ScopeExternal}, Backend{npPodA, 5353, ProtoUDP}},
		{ServiceKey{Addr: npNode6, Port: 30053, Proto: ProtoUDP, Scope: ScopeExternal}, Backend{npPod6, 5353, ProtoUDP}},
	} {
		id := uint32(700 + i)
		must(t, m.UpsertBackend(id, s.be))
		must(t, m.UpsertService(s.key, Service{ID: id, Backends: []uint32{id}}, 0))
	}
	backend.startServers(nil, []netip.AddrPort{netip.AddrPortFrom(npPodA, 5353), netip.AddrPortFrom(npPod6, 5353)})
	e.ip("link", "set", "pod0", "mtu", "1280")
	backend.ip("link", "set", "pod0p", "mtu", "1280")
	// As from a NIC: checksums complete. (A CHECKSUM_PARTIAL packet gets no "too big" from
	// kpr; see icmp_error.)
	setTxChecksum(t, client, "ext0p", false)

	for _, fe := range []netip.AddrPort{netip.AddrPortFrom(npNode4, 30053), netip.AddrPortFrom(npNode6, 30053)} {
		err := client.do(func() error {
			family, level, opt := unix.AF_INET, unix.IPPROTO_IP, unix.IP_MTU_DISCOVER
			if fe.Addr().Is6() {
				family, level, opt = unix.AF_INET6, unix.IPPROTO_IPV6, unix.IPV6_MTU_DISCOVER
			}
			fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return err
			}
			defer unix.Close(fd)
			if err := unix.SetsockoptInt(fd, level, opt, unix.IP_PMTUDISC_DO); err != nil {
				return err
			}
			if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 2}); err != nil {
				return err
			}
			if err := unix.Connect(fd, sockaddr(fe, family)); err != nil {
				return err
			}
			big := make([]byte, 1400)
			if _, err := unix.Write(fd, big); err != nil {
				return fmt.Errorf("first large send: %w", err)
			}
			// The node's answer arrives as an error on the socket, or updates the route.
			deadline := time.Now().Add(2 * time.Second)
			for {
				_, err := unix.Write(fd, big)
				if errors.Is(err, unix.EMSGSIZE) {
					break
				}
				if time.Now().After(deadline) {
					return fmt.Errorf("large sends to %s still go out 2 s after the first (last error %v): the path MTU was not learned", fe, err)
				}
				time.Sleep(50 * time.Millisecond)
			}
			mtu, err := unix.GetsockoptInt(fd, level, map[int]int{unix.AF_INET: unix.IP_MTU, unix.AF_INET6: unix.IPV6_MTU}[family])
			if err != nil || mtu != 1280 {
				return fmt.Errorf("path MTU to %s: %d (%v), want 1280", fe, mtu, err)
			}
			// The ICMP error may also be queued on the socket; take it off before the next send.
			unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
			if _, err := unix.Write(fd, []byte("ping")); err != nil {
				return fmt.Errorf("a datagram that fits to %s: %w", fe, err)
			}
			buf := make([]byte, 512)
			n, err := unix.Read(fd, buf)
			if err != nil || n == 0 {
				return fmt.Errorf("a datagram that fits to %s: %v", fe, err)
			}
			return nil
		})
		if err != nil {
			t.Error(err)
		}
	}
	if s := e.stats(); s.TooBig < 2 {
		t.Errorf("TooBig %d, want at least 2", s.TooBig)
	}
}
