package bpf

import (
	"net/netip"
	"testing"
)

// loadBalancerSourceRanges: a frontend with FlagSourceRanges serves only clients inside one of
// its prefixes (longest-prefix match in kpr_lb_src_ranges_v1 under its svc_id); others are
// dropped before any flow state is made, whether the frontend has backends or not. Prefixes of
// another frontend do not count, and a frontend without the flag serves everyone.
func TestNodePortSourceRanges(t *testing.T) {
	e := newNodePortEnv(t, Config{}, npConfig)
	e.ifindexes()
	e.programServices()
	m := e.d.Maps
	const svcRanged, svcRanged6, svcEmpty, svcOther = 51, 52, 53, 54
	fe4 := netip.AddrPortFrom(npLBVIP, 8080)
	fe6 := netip.AddrPortFrom(npNode6, 30444)
	feEmpty := netip.AddrPortFrom(npLBVIP, 8081)
	must(t, m.UpsertService(ServiceKey{Addr: fe4.Addr(), Port: fe4.Port(), Proto: ProtoTCP, Scope: ScopeExternal},
		Service{ID: svcRanged, Flags: FlagSourceRanges, Backends: []uint32{npBeA}}, 0))
	must(t, m.UpsertService(ServiceKey{Addr: fe6.Addr(), Port: fe6.Port(), Proto: ProtoTCP, Scope: ScopeExternal},
		Service{ID: svcRanged6, Flags: FlagSourceRanges, Backends: []uint32{npBe6}}, 0))
	must(t, m.UpsertService(ServiceKey{Addr: feEmpty.Addr(), Port: feEmpty.Port(), Proto: ProtoTCP, Scope: ScopeExternal},
		Service{ID: svcEmpty, Flags: FlagSourceRanges}, 0))
	for _, r := range []SourceRange{
		{svcRanged, netip.MustParsePrefix("198.18.0.96/28")}, // npClient4 (.100) is inside
		{svcRanged, netip.MustParsePrefix("192.0.2.1/32")},
		{svcRanged6, netip.MustParsePrefix("fd6b:7072::100/128")},
		{svcEmpty, netip.MustParsePrefix("192.0.2.0/24")},
		{svcOther, netip.MustParsePrefix("0.0.0.0/0")}, // someone else's: must not let anyone in
	} {
		must(t, e.n.Maps.AddSourceRange(r))
	}
	got := map[SourceRange]bool{}
	must(t, e.n.Maps.WalkSourceRanges(func(r SourceRange) bool { got[r] = true; return true }))
	if !got[SourceRange{svcRanged, netip.MustParsePrefix("198.18.0.96/28")}] || !got[SourceRange{svcRanged6, netip.MustParsePrefix("fd6b:7072::100/128")}] || len(got) != 5 {
		t.Fatalf("WalkSourceRanges read back %v", got)
	}

	for _, c := range []struct {
		name    string
		src     netip.AddrPort
		dst     netip.AddrPort
		served  bool
		backend netip.AddrPort
	}{
		{"inside the /28", netip.AddrPortFrom(npClient4, 41000), fe4, true, netip.AddrPortFrom(npPodA, 8080)},
		{"the /32", netip.MustParseAddrPort("192.0.2.1:41001"), fe4, true, netip.AddrPortFrom(npPodA, 8080)},
		{"outside", netip.MustParseAddrPort("198.18.0.20:41002"), fe4, false, netip.AddrPort{}},
		{"next to the /32", netip.MustParseAddrPort("192.0.2.2:41003"), fe4, false, netip.AddrPort{}},
		{"ipv6 inside", netip.AddrPortFrom(npClient6, 41004), fe6, true, netip.AddrPortFrom(npPod6, 8080)},
		{"ipv6 outside", netip.MustParseAddrPort("[fd6b:7072::101]:41005"), fe6, false, netip.AddrPort{}},
		{"no endpoints, outside: dropped, not refused", netip.MustParseAddrPort("198.18.0.20:41006"), feEmpty, false, netip.AddrPort{}},
	} {
		t.Run(c.name, func(t *testing.T) {
			before := e.stats()
			in := buildPacket(pktSpec{src: c.src, dst: c.dst, proto: ProtoTCP, tcpFlags: tcpSYN})
			ret, out := e.nodeport(in)
			after := e.stats()
			if c.served {
				translated(t, in, out, ret, c.backend)
				return
			}
			if ret != tcActShot || after.DropSourceRange != before.DropSourceRange+1 {
				t.Fatalf("verdict %d, source-range drops %d -> %d: want TC_ACT_SHOT counted as a source-range drop",
					int32(ret), before.DropSourceRange, after.DropSourceRange)
			}
			if _, ok := e.flows()[c.src]; ok {
				t.Fatal("a flow was created for a blocked client")
			}
		})
	}

	// Without the flag the same frontend serves a client outside the prefixes.
	must(t, m.UpsertService(ServiceKey{Addr: fe4.Addr(), Port: fe4.Port(), Proto: ProtoTCP, Scope: ScopeExternal},
		Service{ID: svcRanged, Backends: []uint32{npBeA}}, 1))
	in := buildPacket(pktSpec{src: netip.MustParseAddrPort("198.18.0.20:41010"), dst: fe4, proto: ProtoTCP, tcpFlags: tcpSYN})
	ret, out := e.nodeport(in)
	translated(t, in, out, ret, netip.AddrPortFrom(npPodA, 8080))

	// Invalid input is refused with the prefix named.
	for _, r := range []SourceRange{{0, netip.MustParsePrefix("10.0.0.0/8")}, {1, netip.MustParsePrefix("10.0.0.1/8")}, {1, netip.MustParsePrefix("::ffff:10.0.0.0/104")}} {
		if err := e.n.Maps.AddSourceRange(r); err == nil {
			t.Errorf("AddSourceRange(%v) accepted", r)
		}
	}
}
