package bpf

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
)

// xdp_nodeport, BPF_PROG_RUN on crafted packets: what it translates must be exactly what the tc
// programs would have made of the packet, and what it does not take must pass untouched.

const (
	xdpDrop = 1
	xdpPass = 2
	xdpTx   = 3
)

// xdpContext is struct xdp_md as BPF_PROG_RUN takes it.
type xdpContext struct {
	Data, DataEnd, DataMeta, IngressIfindex, RxQueueIndex, EgressIfindex uint32
}

// A node of the same LAN (.12) with a pod CIDR routed to it: backends there are reached by the
// device the client's packets come in on, the case XDP takes.
var (
	npNode2    = netip.MustParseAddr("198.18.0.12")
	npNode2MAC = net.HardwareAddr{0x02, 0, 0, 0, 0, 0x0c}
	npRemote   = netip.MustParseAddr("10.244.2.5")
	npRemote6  = netip.MustParseAddr("fd6b:7072:244:2::5")
	npNode2v6  = netip.MustParseAddr("fd6b:7072::12")
)

func (e *npEnv) xdp(pkt []byte) (uint32, []byte) {
	e.t.Helper()
	var ret uint32
	out := make([]byte, len(pkt)+256)
	must(e.t, e.do(func() error {
		opts := &ebpf.RunOptions{Data: pkt, DataOut: out,
			Context: xdpContext{DataEnd: uint32(len(pkt)), IngressIfindex: uint32(e.ext0)}}
		var err error
		ret, err = e.n.objs.XdpNodeport.Run(opts)
		out = opts.DataOut
		return err
	}))
	return ret, out
}

func TestNodePortXDP(t *testing.T) {
	e := newNodePortEnv(t, Config{}, npConfig)
	e.ifindexes()
	e.programServices()
	e.ip("route", "add", "10.244.2.0/24", "via", npNode2.String(), "dev", "ext0")
	e.ip("-6", "route", "add", "fd6b:7072:244:2::/64", "via", npNode2v6.String(), "dev", "ext0")
	e.ip("neigh", "add", npNode2.String(), "lladdr", npNode2MAC.String(), "dev", "ext0", "nud", "permanent")
	e.ip("neigh", "add", npNode2v6.String(), "lladdr", npNode2MAC.String(), "dev", "ext0", "nud", "permanent")
	m := e.d.Maps
	const beR, beR6, beRU = 301, 302, 303
	must(t, m.UpsertBackend(beR, Backend{npRemote, 8080, ProtoTCP}))
	must(t, m.UpsertBackend(beR6, Backend{npRemote6, 8080, ProtoTCP}))
	must(t, m.UpsertBackend(beRU, Backend{npRemote, 5353, ProtoUDP}))
	keyR := ServiceKey{Addr: npNode4, Port: 30085, Proto: ProtoTCP, Scope: ScopeExternal}
	keyR6 := ServiceKey{Addr: npNode6, Port: 30085, Proto: ProtoTCP, Scope: ScopeExternal}
	keyRU := ServiceKey{Addr: npNode4, Port: 30086, Proto: ProtoUDP, Scope: ScopeExternal}
	keyDSR := ServiceKey{Addr: npNode4, Port: 30087, Proto: ProtoTCP, Scope: ScopeExternal}
	keyRanged := ServiceKey{Addr: npNode4, Port: 30088, Proto: ProtoTCP, Scope: ScopeExternal}
	must(t, m.UpsertService(keyR, Service{ID: 71, Backends: []uint32{beR}}, 0))
	must(t, m.UpsertService(keyR6, Service{ID: 72, Backends: []uint32{beR6}}, 0))
	must(t, m.UpsertService(keyRU, Service{ID: 73, Backends: []uint32{beRU}}, 0))
	must(t, m.UpsertService(keyDSR, Service{ID: 74, Flags: FlagDSR, Backends: []uint32{beR}}, 0))
	must(t, m.UpsertService(keyRanged, Service{ID: 75, Flags: FlagSourceRanges, Backends: []uint32{beR}}, 0))
	must(t, e.n.Maps.AddSourceRange(SourceRange{SvcID: 75, Prefix: netip.MustParsePrefix("192.0.2.0/24")}))
	fe := func(k ServiceKey) netip.AddrPort { return netip.AddrPortFrom(k.Addr, k.Port) }

	// sentBack checks an XDP_TX'd packet: checksums from scratch, TTL one less, payload kept,
	// MACs from the route, and returns it.
	sentBack := func(t *testing.T, in []byte, ret uint32, out []byte, dstMAC net.HardwareAddr, allowNoCsum bool) packet {
		t.Helper()
		if ret != xdpTx {
			t.Fatalf("verdict %d, want XDP_TX", ret)
		}
		if len(out) != len(in) {
			t.Fatalf("length %d, want %d", len(out), len(in))
		}
		pin, err := parsePacket(in)
		must(t, err)
		p := checkChecksums(t, out, allowNoCsum)
		if p.ttl != pin.ttl-1 || !bytes.Equal(p.payload, pin.payload) || p.tcpFlags != pin.tcpFlags {
			t.Errorf("ttl %d payload %q flags %#x, want %d %q %#x", p.ttl, p.payload, p.tcpFlags, pin.ttl-1, pin.payload, pin.tcpFlags)
		}
		if !bytes.Equal(p.srcMAC, ext0MAC) || !bytes.Equal(p.dstMAC, dstMAC) {
			t.Errorf("MACs %s -> %s, want %s -> %s", p.srcMAC, p.dstMAC, ext0MAC, dstMAC)
		}
		return p
	}

	for _, tc := range []struct {
		name           string
		client         netip.AddrPort
		key            ServiceKey
		backend        netip.AddrPort
		proto          Proto
		noCsum         bool
		clientMACCheck bool
	}{
		{"tcp4", netip.AddrPortFrom(npClient4, 45000), keyR, netip.AddrPortFrom(npRemote, 8080), ProtoTCP, false, true},
		{"tcp6", netip.AddrPortFrom(npClient6, 45001), keyR6, netip.AddrPortFrom(npRemote6, 8080), ProtoTCP, false, true},
		{"udp4", netip.AddrPortFrom(npClient4, 45002), keyRU, netip.AddrPortFrom(npRemote, 5353), ProtoUDP, false, true},
		{"udp4 without checksum", netip.AddrPortFrom(npClient4, 45003), keyRU, netip.AddrPortFrom(npRemote, 5353), ProtoUDP, true, true},
	} {
		t.Run(tc.name+": a flow to a backend behind the same device is translated and sent back out, both ways", func(t *testing.T) {
			flags, next, replyFlags := uint8(tcpSYN), uint8(tcpACK), uint8(tcpSYN|tcpACK)
			if tc.proto == ProtoUDP {
				flags, next, replyFlags = 0, 0, 0
			}
			in := buildPacket(pktSpec{src: tc.client, dst: fe(tc.key), proto: tc.proto, tcpFlags: flags, payload: []byte("first"), noCsum: tc.noCsum})
			before := e.stats()
			ret, out := e.xdp(in)
			p := sentBack(t, in, ret, out, npNode2MAC, tc.noCsum)
			snat := npNode4
			if tc.client.Addr().Is6() {
				snat = npNode6
			}
			if p.dst != tc.backend || p.src.Addr() != snat || p.src.Port() < DefaultSNATPorts.First {
				t.Fatalf("sent %s -> %s, want %s:<SNAT port> -> %s", p.src, p.dst, snat, tc.backend)
			}
			if tc.noCsum && binary.BigEndian.Uint16(p.l4[6:]) != 0 {
				t.Errorf("UDP checksum %#x, want it left 0 (none)", binary.BigEndian.Uint16(p.l4[6:]))
			}
			f := e.flows()[tc.client]
			if f.Backend != tc.backend || f.SNAT != p.src || f.NoReverse {
				t.Errorf("flow %+v, want backend %s SNAT %s", f, tc.backend, p.src)
			}
			if after := e.stats(); after.XDPTx != before.XDPTx+1 || after.Forwarded != before.Forwarded+1 || after.NewFlows != before.NewFlows+1 {
				t.Errorf("stats: XDPTx %d->%d Forwarded %d->%d NewFlows %d->%d, want one more each", before.XDPTx, after.XDPTx, before.Forwarded, after.Forwarded, before.NewFlows, after.NewFlows)
			}

			// The tc program, had the packet reached it, agrees on the flow.
			in2 := buildPacket(pktSpec{src: tc.client, dst: fe(tc.key), proto: tc.proto, tcpFlags: next, payload: []byte("second")})
			ret, out = e.nodeport(in2)
			if ret != tcActRedirect {
				t.Fatalf("tc verdict %d, want TC_ACT_REDIRECT", int32(ret))
			}
			if q := checkChecksums(t, out, false); q.src != p.src || q.dst != p.dst {
				t.Errorf("tc sent %s -> %s, XDP %s -> %s", q.src, q.dst, p.src, p.dst)
			}

			reply := buildPacket(pktSpec{src: tc.backend, dst: p.src, proto: tc.proto, tcpFlags: replyFlags, payload: []byte("answer"),
				srcMAC: npNode2MAC, dstMAC: ext0MAC, noCsum: tc.noCsum})
			ret, out = e.xdp(reply)
			r := sentBack(t, reply, ret, out, clientMAC, tc.noCsum)
			if r.src != fe(tc.key) || r.dst != tc.client {
				t.Errorf("reply %s -> %s, want %s -> %s", r.src, r.dst, fe(tc.key), tc.client)
			}
		})
	}

	passes := func(t *testing.T, what string, in []byte) {
		t.Helper()
		ret, out := e.xdp(in)
		if ret != xdpPass {
			t.Errorf("%s: verdict %d, want XDP_PASS", what, ret)
		}
		if !bytes.Equal(out, in) {
			t.Errorf("%s: packet changed", what)
		}
	}
	t.Run("what the tc programs must do passes untouched", func(t *testing.T) {
		c := netip.AddrPortFrom(npClient4, 45100)
		passes(t, "a backend on a pod device", buildPacket(pktSpec{src: c, dst: netip.AddrPortFrom(npNode4, 30080), proto: ProtoTCP, tcpFlags: tcpSYN}))
		passes(t, "no endpoints (refusal)", buildPacket(pktSpec{src: c, dst: fe(npKeyEmpty), proto: ProtoTCP, tcpFlags: tcpSYN}))
		passes(t, "a DSR SYN (the option)", buildPacket(pktSpec{src: c, dst: fe(keyDSR), proto: ProtoTCP, tcpFlags: tcpSYN}))
		passes(t, "IPv4 options", buildPacket(pktSpec{src: netip.AddrPortFrom(npClient4, 45101), dst: fe(keyR), proto: ProtoTCP, tcpFlags: tcpSYN, options: []byte{1, 1, 1, 0}}))
		passes(t, "a fragment", buildPacket(pktSpec{src: netip.AddrPortFrom(npClient4, 45102), dst: fe(keyRU), proto: ProtoUDP, fragOff: 0x2000}))
		passes(t, "TTL 1", buildPacket(pktSpec{src: netip.AddrPortFrom(npClient4, 45103), dst: fe(keyR), proto: ProtoTCP, tcpFlags: tcpSYN, ttl: 1}))
		passes(t, "not a frontend", buildPacket(pktSpec{src: c, dst: netip.AddrPortFrom(npNode4, 22), proto: ProtoTCP, tcpFlags: tcpSYN}))
		passes(t, "a frontend's unserved port", buildPacket(pktSpec{src: c, dst: netip.AddrPortFrom(npLBVIP, 81), proto: ProtoTCP, tcpFlags: tcpSYN}))
	})

	t.Run("a DSR flow's packets after the SYN are translated by XDP, destination only", func(t *testing.T) {
		c := netip.AddrPortFrom(npClient4, 45200)
		syn := buildPacket(pktSpec{src: c, dst: fe(keyDSR), proto: ProtoTCP, tcpFlags: tcpSYN})
		if ret, _ := e.nodeport(syn); ret != tcActRedirect {
			t.Fatalf("tc: SYN verdict %d", int32(ret))
		}
		in := buildPacket(pktSpec{src: c, dst: fe(keyDSR), proto: ProtoTCP, tcpFlags: tcpACK, payload: []byte("data")})
		ret, out := e.xdp(in)
		if p := sentBack(t, in, ret, out, npNode2MAC, false); p.src != c || p.dst != netip.AddrPortFrom(npRemote, 8080) {
			t.Errorf("sent %s -> %s, want %s -> %s:8080", p.src, p.dst, c, npRemote)
		}
	})

	t.Run("a client outside loadBalancerSourceRanges is dropped in XDP", func(t *testing.T) {
		before := e.stats()
		ret, _ := e.xdp(buildPacket(pktSpec{src: netip.AddrPortFrom(npClient4, 45300), dst: fe(keyRanged), proto: ProtoTCP, tcpFlags: tcpSYN}))
		if ret != xdpDrop {
			t.Errorf("verdict %d, want XDP_DROP", ret)
		}
		if after := e.stats(); after.DropSourceRange != before.DropSourceRange+1 {
			t.Errorf("DropSourceRange %d -> %d", before.DropSourceRange, after.DropSourceRange)
		}
		in := buildPacket(pktSpec{src: netip.MustParseAddrPort("192.0.2.7:45301"), dst: fe(keyRanged), proto: ProtoTCP, tcpFlags: tcpSYN})
		e.ip("neigh", "replace", "192.0.2.7", "lladdr", clientMAC.String(), "dev", "ext0", "nud", "permanent")
		e.ip("route", "replace", "192.0.2.0/24", "dev", "ext0")
		ret, out := e.xdp(in)
		sentBack(t, in, ret, out, npNode2MAC, false)
	})
}

// TestNodePortXDPTraffic: real packets through xdp_nodeport attached in native mode to a veth.
// The client's namespace also holds the "remote" backend address (10.244.2.5, routed by the
// node back out of ext0), so a NodePort flow goes in and out of ext0 twice each way and XDP
// sends every translated packet with XDP_TX once the neighbours are known. The client side
// captures and checks every checksum from scratch, with the client's TX checksum offload on
// (CHECKSUM_PARTIAL frames reach XDP) and off.
//
//	client ns: ext0p 198.18.0.100, lo 10.244.2.5 --- ext0 [node ns: xdp_nodeport, tc_nodeport]
func TestNodePortXDPTraffic(t *testing.T) {
	e, client, _ := newTrafficEnv(t)
	m := e.d.Maps
	remote := netip.MustParseAddr("10.244.2.5")
	client.ip("addr", "add", remote.String()+"/32", "dev", "lo")
	e.ip("route", "add", "10.244.2.0/24", "via", npClient4.String(), "dev", "ext0")
	// XDP_TX on a veth hands the frame to the peer's NAPI, which an XDP program there turns on
	// (as it would be on a real NIC's receiver, here it only passes the frames).
	passProg, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.XDP, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, xdpPass), asm.Return()}})
	must(t, err)
	t.Cleanup(func() { passProg.Close() })
	must(t, client.do(func() error {
		ifi, err := net.InterfaceByName("ext0p")
		if err != nil {
			return err
		}
		l, err := link.AttachXDP(link.XDPOptions{Program: passProg, Interface: ifi.Index})
		if err != nil {
			return err
		}
		t.Cleanup(func() { l.Close() })
		return nil
	}))
	// As the agent attaches them: both tc programs on the device too, for what XDP passes on.
	must(t, e.do(func() error {
		if err := e.n.AttachTC(e.ext0, TCReply); err != nil {
			return err
		}
		return e.n.AttachXDP(e.ext0, XDPNative)
	}))

	// A second attach (a restart) updates the pinned link in place.
	must(t, e.do(func() error { return e.n.AttachXDP(e.ext0, XDPNative) }))
	if got, err := XDPAttached(e.pinDir); err != nil || !slices.Equal(got, []int{e.ext0}) {
		t.Fatalf("XDPAttached = %v, %v; want [%d]", got, err, e.ext0)
	}
	// The benchmark reads the XDP program's run time through RunStats, by its link's name.
	if st, err := RunStats(e.pinDir); err != nil {
		t.Fatalf("RunStats: %v", err)
	} else if _, ok := st[fmt.Sprintf("xdp_%d", e.ext0)]; !ok {
		t.Errorf("RunStats has no entry for the XDP link xdp_%d: %v", e.ext0, slices.Collect(maps.Keys(st)))
	}
	t.Cleanup(func() {
		// Detaching leaves no pin, and the device passes to tc alone.
		if err := e.n.DetachXDP(e.ext0); err != nil {
			t.Errorf("DetachXDP: %v", err)
		}
		if got, err := XDPAttached(e.pinDir); err != nil || len(got) != 0 {
			t.Errorf("after DetachXDP: XDPAttached = %v, %v", got, err)
		}
	})

	keys := map[string]ServiceKey{
		"tcp": {Addr: npNode4, Port: 30085, Proto: ProtoTCP, Scope: ScopeExternal},
		"udp": {Addr: npNode4, Port: 30086, Proto: ProtoUDP, Scope: ScopeExternal},
	}
	must(t, m.UpsertBackend(401, Backend{remote, 8080, ProtoTCP}))
	must(t, m.UpsertBackend(402, Backend{remote, 5353, ProtoUDP}))
	must(t, m.UpsertService(keys["tcp"], Service{ID: 401, Backends: []uint32{401}}, 0))
	must(t, m.UpsertService(keys["udp"], Service{ID: 402, Backends: []uint32{402}}, 0))
	client.startServers([]netip.AddrPort{netip.AddrPortFrom(remote, 8080)}, []netip.AddrPort{netip.AddrPortFrom(remote, 5353)})

	for _, offload := range []bool{true, false} {
		t.Run(fmt.Sprintf("tx checksum offload %v", offload), func(t *testing.T) {
			setTxChecksum(t, client, "ext0p", offload)
			toClient := startCapture(t, client, "ext0p")
			before := e.stats()
			for i := range 5 {
				peer, err := client.tcpPeer(netip.AddrPortFrom(keys["tcp"].Addr, keys["tcp"].Port))
				if err != nil {
					t.Fatalf("tcp connection %d: %v; stats %+v", i, err, e.stats())
				}
				checkSNATPeer(t, "tcp4", peer)
				from, peer, err := client.udpPeer(netip.AddrPortFrom(keys["udp"].Addr, keys["udp"].Port))
				if err != nil {
					t.Fatalf("udp request %d: %v", i, err)
				}
				if from != netip.AddrPortFrom(npNode4, 30086) {
					t.Errorf("udp answer from %s, want the frontend", from)
				}
				checkSNATPeer(t, "udp4", peer)
			}
			after := e.stats()
			// 5 connections and 5 requests, both directions, a few packets each. Without offload
			// XDP sends them all; with it, every frame looks CHECKSUM_PARTIAL and goes by tc.
			xdp, all := after.XDPTx-before.XDPTx, after.Forwarded+after.Replies-before.Forwarded-before.Replies
			if !offload && (xdp < 20 || xdp != all) {
				t.Errorf("XDP sent %d of %d translated packets, want all, at least 20 (stats %+v)", xdp, all, after)
			}
			if offload && (xdp != 0 || all < 20) {
				t.Errorf("XDP sent %d of %d translated packets, want none of at least 20: CHECKSUM_PARTIAL frames are tc's (stats %+v)", xdp, all, after)
			}
			n := 0
			for _, cp := range toClient.stop() {
				p, err := parsePacket(cp.data)
				if err != nil || !(p.dst.Addr() == remote || p.src == netip.AddrPortFrom(npNode4, 30085) || p.src == netip.AddrPortFrom(npNode4, 30086)) {
					continue
				}
				n++
				data := cp.data
				if cp.partial {
					if data, err = completePartial(data); err != nil {
						t.Fatal(err)
					}
				}
				if _, errs := checksumErrors(data, false); len(errs) > 0 {
					t.Errorf("%s -> %s (partial %v): %v\n%x", p.src, p.dst, cp.partial, errs, cp.data)
				}
			}
			if n < 20 {
				t.Errorf("captured %d translated packets, want at least 20", n)
			}
		})
	}
}
