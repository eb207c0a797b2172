package bpf

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"slices"
	"testing"
)

// Direct server return, BPF_PROG_RUN on crafted packets. The node of these tests plays both
// parts: the node a client sends to (it inserts the option) and the node of the backend (it
// learns from the option and sends the backend's replies to the client from the frontend).

const (
	dsrOpt4Type = 158  // RFC 4727 experimental IPv4 option, copied
	dsrOpt6Type = 0x1e // RFC 4727 experimental IPv6 destination option, "skip if unknown"
)

// dsrOpt4 is the IPv4 option carrying fe.
func dsrOpt4(fe netip.AddrPort) []byte {
	o := []byte{dsrOpt4Type, 8, 0, 0, 0, 0, 0, 0}
	binary.BigEndian.PutUint16(o[2:], fe.Port())
	a := fe.Addr().As4()
	copy(o[4:], a[:])
	return o
}

// dsrOpt6 is the destination options header carrying fe, followed by next.
func dsrOpt6(fe netip.AddrPort, next Proto) []byte {
	o := make([]byte, 24)
	o[0], o[1], o[2], o[3] = byte(next), 2, dsrOpt6Type, 20
	a := fe.Addr().As16()
	copy(o[4:], a[:])
	binary.BigEndian.PutUint16(o[20:], fe.Port())
	return o
}

// withDstOpts inserts a destination options header hdr (whose next header field is already
// set) behind the IPv6 header of b, as a sender would build it.
func withDstOpts(b, hdr []byte) []byte {
	out := slices.Concat(b[:ethHdrLen+ipv6Len], hdr, b[ethHdrLen+ipv6Len:])
	l3 := out[ethHdrLen:]
	binary.BigEndian.PutUint16(l3[4:], binary.BigEndian.Uint16(l3[4:])+uint16(len(hdr)))
	l3[6] = 60
	return out
}

// stripDstOpts checks that b carries exactly one destination options header behind its IPv6
// header and returns it and the packet without it, whose checksums must then hold.
func stripDstOpts(t *testing.T, b []byte) (hdr, rest []byte) {
	t.Helper()
	hdr, rest = splitDstOpts(b)
	if hdr == nil {
		t.Fatalf("no destination options header\n%x", b)
	}
	return hdr, rest
}

// splitDstOpts returns the destination options header behind b's IPv6 header and b without
// it, or nil and b if there is none.
func splitDstOpts(b []byte) (hdr, rest []byte) {
	if len(b) < ethHdrLen+ipv6Len+8 || binary.BigEndian.Uint16(b[12:]) != 0x86dd || b[ethHdrLen+6] != 60 {
		return nil, b
	}
	l3 := b[ethHdrLen:]
	n := (int(l3[ipv6Len+1]) + 1) * 8
	if len(l3) < ipv6Len+n {
		return nil, b
	}
	hdr = slices.Clone(l3[ipv6Len : ipv6Len+n])
	rest = slices.Concat(b[:ethHdrLen+ipv6Len], b[ethHdrLen+ipv6Len+n:])
	binary.BigEndian.PutUint16(rest[ethHdrLen+4:], binary.BigEndian.Uint16(l3[4:])-uint16(n))
	rest[ethHdrLen+6] = hdr[0]
	return hdr, rest
}

func TestNodePortDSR(t *testing.T) {
	e := newNodePortEnv(t, Config{}, npConfig)
	e.ifindexes()
	e.programServices()
	m := e.d.Maps
	const svcTCP, svcUDP, svcTCP6 = 91, 92, 93
	keyTCP := ServiceKey{Addr: npNode4, Port: 30082, Proto: ProtoTCP, Scope: ScopeExternal}
	keyUDP := ServiceKey{Addr: npNode4, Port: 30083, Proto: ProtoUDP, Scope: ScopeExternal}
	keyTCP6 := ServiceKey{Addr: npNode6, Port: 30082, Proto: ProtoTCP, Scope: ScopeExternal}
	must(t, m.UpsertService(keyTCP, Service{ID: svcTCP, Flags: FlagDSR, Backends: []uint32{npBeA, npBeB}}, 0))
	must(t, m.UpsertService(keyUDP, Service{ID: svcUDP, Flags: FlagDSR, Backends: []uint32{npBeUDP}}, 0))
	must(t, m.UpsertService(keyTCP6, Service{ID: svcTCP6, Flags: FlagDSR, Backends: []uint32{npBe6}}, 0))
	feTCP, feUDP, feTCP6 := netip.AddrPortFrom(keyTCP.Addr, keyTCP.Port), netip.AddrPortFrom(keyUDP.Addr, keyUDP.Port), netip.AddrPortFrom(keyTCP6.Addr, keyTCP6.Port)
	tcpA, tcpB := netip.AddrPortFrom(npPodA, 8080), netip.AddrPortFrom(npPodB, 8080)

	// sent checks a packet tc_nodeport forwarded by DSR: to one of want, from the client
	// itself, TTL one less, payload and flags kept, checksums right; with the option (IPv4:
	// first, before the packet's own) iff withOpt.
	sent := func(t *testing.T, in, out []byte, ret uint32, fe netip.AddrPort, withOpt bool, want ...netip.AddrPort) packet {
		t.Helper()
		if ret != tcActRedirect {
			t.Fatalf("verdict %d, want TC_ACT_REDIRECT", int32(ret))
		}
		pin, err := parsePacket(in)
		must(t, err)
		v6 := pin.src.Addr().Is6()
		grow := 0
		if withOpt {
			grow = 8
			if v6 {
				grow = 24
			}
		}
		if len(out) != len(in)+grow {
			t.Fatalf("length %d, want %d", len(out), len(in)+grow)
		}
		check := out
		if v6 && withOpt {
			var hdr []byte
			hdr, check = stripDstOpts(t, out)
			if want := dsrOpt6(fe, pin.proto); !bytes.Equal(hdr, want) {
				t.Errorf("destination options %x, want %x", hdr, want)
			}
		}
		p := checkChecksums(t, check, false)
		if !slices.Contains(want, p.dst) {
			t.Fatalf("sent to %s, want one of %v", p.dst, want)
		}
		if p.src != pin.src {
			t.Errorf("source %s, want the client's own %s", p.src, pin.src)
		}
		if p.ttl != pin.ttl-1 || !bytes.Equal(p.payload, pin.payload) || p.tcpFlags != pin.tcpFlags {
			t.Errorf("ttl %d payload %q flags %#x, want %d %q %#x", p.ttl, p.payload, p.tcpFlags, pin.ttl-1, pin.payload, pin.tcpFlags)
		}
		if !v6 {
			wantOpts := slices.Clone(pin.l3[ipv4Len:])
			if withOpt {
				wantOpts = slices.Concat(dsrOpt4(fe), wantOpts)
			}
			if !bytes.Equal(p.l3[ipv4Len:], wantOpts) {
				t.Errorf("IPv4 options %x, want %x", p.l3[ipv4Len:], wantOpts)
			}
		}
		if !bytes.Equal(p.dstMAC, podMACs[p.dst.Addr()]) || !bytes.Equal(p.srcMAC, pod0MAC) {
			t.Errorf("MACs %s -> %s, want %s -> %s", p.srcMAC, p.dstMAC, pod0MAC, podMACs[p.dst.Addr()])
		}
		return p
	}

	client := netip.AddrPortFrom(npClient4, 43000)
	var backend netip.AddrPort
	t.Run("a SYN goes to a backend from the client itself, the frontend in an IPv4 option", func(t *testing.T) {
		in := buildPacket(pktSpec{src: client, dst: feTCP, proto: ProtoTCP, tcpFlags: tcpSYN})
		ret, out := e.nodeport(in)
		backend = sent(t, in, out, ret, feTCP, true, tcpA, tcpB).dst
		f := e.flows()[client]
		if f.Backend != backend || f.SNAT != client || f.SvcID != svcTCP {
			t.Errorf("flow %+v: want backend %s, no SNAT", f, backend)
		}
	})
	if !backend.IsValid() {
		t.FailNow()
	}

	t.Run("the flow's other packets go to the same backend without the option, a repeated SYN with it", func(t *testing.T) {
		for i, flags := range []uint8{tcpACK, tcpACK | tcpPSH, tcpSYN, tcpACK | tcpFIN} {
			in := buildPacket(pktSpec{src: client, dst: feTCP, proto: ProtoTCP, tcpFlags: flags, payload: []byte{'d', byte(i)}})
			ret, out := e.nodeport(in)
			sent(t, in, out, ret, feTCP, flags == tcpSYN, backend)
		}
	})

	t.Run("the packet's own IPv4 options follow kpr's", func(t *testing.T) {
		c := netip.AddrPortFrom(npClient4, 43001)
		opts := slices.Concat([]byte{1, 1, 7, 7, 4}, make([]byte, 27)) // NOP NOP, record route: 32 bytes, IHL 13
		in := buildPacket(pktSpec{src: c, dst: feTCP, proto: ProtoTCP, tcpFlags: tcpSYN, options: opts})
		ret, out := e.nodeport(in)
		sent(t, in, out, ret, feTCP, true, tcpA, tcpB)
	})

	t.Run("no room for the option in a full IPv4 header: dropped and counted", func(t *testing.T) {
		c := netip.AddrPortFrom(npClient4, 43002)
		opts := slices.Concat([]byte{1, 1, 7, 35, 4}, make([]byte, 31)) // 36 bytes, IHL 14
		in := buildPacket(pktSpec{src: c, dst: feTCP, proto: ProtoTCP, tcpFlags: tcpSYN, options: opts})
		before := e.stats()
		if ret, _ := e.nodeport(in); ret != tcActShot {
			t.Errorf("verdict %d, want TC_ACT_SHOT", int32(ret))
		}
		if after := e.stats(); after.DropDSRNoRoom != before.DropDSRNoRoom+1 {
			t.Errorf("DropDSRNoRoom %d -> %d, want one more", before.DropDSRNoRoom, after.DropDSRNoRoom)
		}
	})

	t.Run("every UDP datagram carries the option", func(t *testing.T) {
		c := netip.AddrPortFrom(npClient4, 43003)
		for i := range 3 {
			in := buildPacket(pktSpec{src: c, dst: feUDP, proto: ProtoUDP, payload: []byte{'q', byte(i)}})
			ret, out := e.nodeport(in)
			sent(t, in, out, ret, feUDP, true, netip.AddrPortFrom(npPodA, 5353))
		}
	})

	t.Run("IPv6: the frontend in a destination options header", func(t *testing.T) {
		c := netip.AddrPortFrom(npClient6, 43004)
		be6 := netip.AddrPortFrom(npPod6, 8080)
		in := buildPacket(pktSpec{src: c, dst: feTCP6, proto: ProtoTCP, tcpFlags: tcpSYN, payload: []byte("syn data")})
		ret, out := e.nodeport(in)
		sent(t, in, out, ret, feTCP6, true, be6)
		in = buildPacket(pktSpec{src: c, dst: feTCP6, proto: ProtoTCP, tcpFlags: tcpACK})
		ret, out = e.nodeport(in)
		sent(t, in, out, ret, feTCP6, false, be6)
	})

	t.Run("a backend on this node answers from the frontend", func(t *testing.T) {
		in := buildPacket(pktSpec{src: backend, dst: client, proto: ProtoTCP, tcpFlags: tcpSYN | tcpACK, payload: []byte("hi"),
			srcMAC: podMACs[backend.Addr()], dstMAC: pod0MAC})
		ret, out := e.reply(in)
		if ret != tcActRedirect {
			t.Fatalf("verdict %d, want TC_ACT_REDIRECT", int32(ret))
		}
		if p := checkChecksums(t, out, false); p.src != feTCP || p.dst != client || !bytes.Equal(p.dstMAC, clientMAC) {
			t.Errorf("reply %s -> %s (to %s), want %s -> %s (to %s)", p.src, p.dst, p.dstMAC, feTCP, client, clientMAC)
		}
	})

	// The backend's node: another node (.12) forwarded a client's flow to a pod here.
	t.Run("the backend's node learns the frontend from the option and answers from it", func(t *testing.T) {
		other := netip.MustParseAddrPort("198.18.0.12:30082")
		other6 := netip.MustParseAddrPort("[fd6b:7072::12]:30082")
		for _, tc := range []struct {
			client, fe, pod netip.AddrPort
			proto           Proto
		}{
			{netip.AddrPortFrom(npClient4, 44000), other, netip.AddrPortFrom(npPodC, 8080), ProtoTCP},
			{netip.AddrPortFrom(npClient4, 44001), other, netip.AddrPortFrom(npPodC, 8080), ProtoUDP},
			{netip.AddrPortFrom(npClient6, 44002), other6, netip.AddrPortFrom(npPod6, 8080), ProtoTCP},
		} {
			spec := pktSpec{src: tc.client, dst: tc.pod, proto: tc.proto, tcpFlags: tcpSYN}
			if tc.client.Addr().Is4() {
				spec.options = dsrOpt4(tc.fe)
			}
			in := buildPacket(spec)
			if tc.client.Addr().Is6() {
				in = withDstOpts(in, dsrOpt6(tc.fe, tc.proto))
			}
			before := e.stats()
			ret, out := e.nodeport(in)
			untouched(t, "client to pod with the option", in, out, ret)
			if after := e.stats(); after.DSRLearned != before.DSRLearned+1 {
				t.Errorf("%s: DSRLearned %d -> %d, want one more", tc.client, before.DSRLearned, after.DSRLearned)
			}

			reply := buildPacket(pktSpec{src: tc.pod, dst: tc.client, proto: tc.proto, tcpFlags: tcpSYN | tcpACK, payload: []byte("answer"),
				srcMAC: podMACs[tc.pod.Addr()], dstMAC: pod0MAC})
			ret, out = e.reply(reply)
			if ret != tcActRedirect {
				t.Fatalf("%s: reply verdict %d, want TC_ACT_REDIRECT", tc.client, int32(ret))
			}
			p := checkChecksums(t, out, false)
			if p.src != tc.fe || p.dst != tc.client || p.ttl != 63 || string(p.payload) != "answer" {
				t.Errorf("reply %s -> %s ttl %d %q, want %s -> %s ttl 63", p.src, p.dst, p.ttl, p.payload, tc.fe, tc.client)
			}
			if !bytes.Equal(p.srcMAC, ext0MAC) || !bytes.Equal(p.dstMAC, clientMAC) {
				t.Errorf("MACs %s -> %s, want %s -> %s", p.srcMAC, p.dstMAC, ext0MAC, clientMAC)
			}
		}
	})

	t.Run("options that are not kpr's teach nothing", func(t *testing.T) {
		c := netip.AddrPortFrom(npClient4, 44010)
		pod := netip.AddrPortFrom(npPodC, 8080)
		bad := dsrOpt4(netip.MustParseAddrPort("198.18.0.12:30082"))
		bad[0] = 159
		for _, opts := range [][]byte{bad, {1, 1, 1, 0}, slices.Concat([]byte{1, 1, 1, 1}, dsrOpt4(netip.MustParseAddrPort("198.18.0.12:0")))} {
			in := buildPacket(pktSpec{src: c, dst: pod, proto: ProtoTCP, tcpFlags: tcpSYN, options: opts})
			before := e.stats()
			ret, out := e.nodeport(in)
			untouched(t, "client to pod", in, out, ret)
			if after := e.stats(); after.DSRLearned != before.DSRLearned {
				t.Errorf("options %x: learned", opts)
			}
		}
		reply := buildPacket(pktSpec{src: pod, dst: c, proto: ProtoTCP, tcpFlags: tcpSYN | tcpACK, srcMAC: podMACs[pod.Addr()], dstMAC: pod0MAC})
		ret, out := e.reply(reply)
		untouched(t, "the pod's reply", reply, out, ret)
		// An IPv6 destination options header of someone else's passes as before.
		c6 := netip.AddrPortFrom(npClient6, 44011)
		hdr := dsrOpt6(netip.MustParseAddrPort("[fd6b:7072::12]:30082"), ProtoTCP)
		hdr[2] = 0x1f
		in := withDstOpts(buildPacket(pktSpec{src: c6, dst: netip.AddrPortFrom(npPod6, 8080), proto: ProtoTCP, tcpFlags: tcpSYN}), hdr)
		ret, out = e.nodeport(in)
		untouched(t, "IPv6 with other destination options", in, out, ret)
	})
}
