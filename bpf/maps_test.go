package bpf

import (
	"encoding/binary"
	"maps"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// The schema in docs/ARCHITECTURE.md, in bytes: a change to sock.c that
// moves these is a new schema version, not an edit.
var schemaSizes = map[string][2]int{
	sockMapKprSvcV1:           {24, 12},
	sockMapKprBackendsV1:      {4, 20},
	sockMapKprRevnatV1:        {4, 20},
	sockMapKprSkRevnatV1:      {32, 24},
	sockMapKprSkPeerV1:        {4, 44},
	sockMapKprSkConnV1:        {4, 8 + 44 + 4},
	sockMapKprSkRevnatPortsV1: {4, 1},
	sockMapKprAffinityV1:      {16, 8},
	sockMapKprAffinityMatchV1: {8, 1},
	sockMapKprSvcCidrsV1:      {20, 1},
	sockMapKprBindGuardV1:     {4, 8 + 4 + 4 + 16*16},
}

func TestGeneratedTypesMatchObject(t *testing.T) {
	spec, err := loadSock()
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range schemaSizes {
		ms, ok := spec.Maps[name]
		if !ok {
			t.Fatalf("object has no map %s", name)
		}
		if got := [2]int{int(ms.KeySize), int(ms.ValueSize)}; got != want {
			t.Errorf("%s: object key/value size %v, schema %v", name, got, want)
		}
		if got := mapLayouts[name]; got != want {
			t.Errorf("%s: Go types key/value size %v, schema %v", name, got, want)
		}
		if ms.Pinning != ebpf.PinByName {
			t.Errorf("%s: pinning %v, want by name", name, ms.Pinning)
		}
	}
	if ms := spec.Maps[sockMapKprSvcCidrsV1]; ms.Type != ebpf.LPMTrie || ms.Flags&unix.BPF_F_NO_PREALLOC == 0 || ms.MaxEntries != MaxServiceCIDRs {
		t.Errorf("%s: type %v flags %#x max_entries %d, want an LPM trie without preallocation of %d entries",
			sockMapKprSvcCidrsV1, ms.Type, ms.Flags, ms.MaxEntries, MaxServiceCIDRs)
	}
	// Fields the Go side relies on, at the offsets the C side uses.
	if f, _ := reflect.TypeFor[sockSvcKey]().FieldByName("Slot"); f.Offset != 20 {
		t.Errorf("svc_key.slot at offset %d, want 20", f.Offset)
	}
	if n := binary.Size(sockSvcValue{}); n != 12 {
		t.Errorf("svc_value is %d bytes", n)
	}
}

// newUnpinnedMaps creates the maps from the object's specs without pinning,
// so map I/O can be tested without a bpffs.
func newUnpinnedMaps(t *testing.T) *LBMaps {
	t.Helper()
	requireRoot(t)
	spec, err := loadSock()
	if err != nil {
		t.Fatal(err)
	}
	var sm sockMaps
	for _, ms := range spec.Maps {
		ms.Pinning = ebpf.PinNone
		if ms.Type != ebpf.SkStorage { // sized by the sockets, not by max_entries
			ms.MaxEntries = 256
		}
	}
	coll, err := ebpf.NewCollection(&ebpf.CollectionSpec{Maps: spec.Maps})
	if err != nil {
		t.Fatalf("create maps: %+v", err)
	}
	if err := coll.Assign(&sm); err != nil {
		t.Fatal(err)
	}
	m := newLBMaps(&sm)
	t.Cleanup(func() { m.Close() })
	return m
}

func TestMapRoundTrip(t *testing.T) {
	m := newUnpinnedMaps(t)

	backends := map[uint32]Backend{
		7: {netip.MustParseAddr("10.244.1.2"), 8080, ProtoTCP},
		8: {netip.MustParseAddr("fd6b:7072:244:1::2"), 53, ProtoUDP},
		9: {netip.MustParseAddr("10.244.2.9"), 65535, ProtoSCTP},
	}
	for id, b := range backends {
		must(t, m.UpsertBackend(id, b))
		must(t, m.UpsertBackend(id, b)) // idempotent
	}
	services := map[ServiceKey]Service{
		{Addr: netip.MustParseAddr("10.96.0.10"), Port: 443, Proto: ProtoTCP}:                           {ID: 1, Flags: FlagUnreachable, AffinityTimeoutSec: 10800, Backends: []uint32{7, 9}},
		{Addr: netip.MustParseAddr("fd6b:7072:96::a"), Port: 53, Proto: ProtoUDP, Scope: ScopeExternal}: {ID: 2, Backends: []uint32{8}},
		{Addr: netip.MustParseAddr("10.96.0.10")}:                                                       {},
		{Addr: netip.MustParseAddr("10.96.0.11"), Port: 80, Proto: ProtoTCP}:                            {ID: 3, Flags: FlagUnreachable},
	}
	for k, s := range services {
		must(t, m.UpsertService(k, s, 0))
	}
	revnats := map[uint32]RevNat{
		1: {netip.MustParseAddr("10.96.0.10"), 443},
		2: {netip.MustParseAddr("fd6b:7072:96::a"), 53},
	}
	for id, r := range revnats {
		must(t, m.UpsertRevNat(id, r))
	}

	gotSvcs, err := m.Services()
	must(t, err)
	if !reflect.DeepEqual(gotSvcs, services) {
		t.Fatalf("Services() =\n%v\nwant\n%v", gotSvcs, services)
	}
	gotBes, err := m.Backends()
	must(t, err)
	if !maps.Equal(gotBes, backends) {
		t.Fatalf("Backends() = %v, want %v", gotBes, backends)
	}
	gotRns, err := m.RevNats()
	must(t, err)
	if !maps.Equal(gotRns, revnats) {
		t.Fatalf("RevNats() = %v, want %v", gotRns, revnats)
	}

	matches := map[AffinityMatch]struct{}{{1, 7}: {}, {1, 9}: {}, {3, 7}: {}}
	for am := range matches {
		must(t, m.UpsertAffinityMatch(am.SvcID, am.BackendID))
		must(t, m.UpsertAffinityMatch(am.SvcID, am.BackendID)) // idempotent
	}
	gotMatches, err := m.AffinityMatches()
	must(t, err)
	if !maps.Equal(gotMatches, matches) {
		t.Fatalf("AffinityMatches() = %v, want %v", gotMatches, matches)
	}
	var rawMatch sockAffinityMatchKey
	var rawVal uint8
	it := m.affinityMatch.Iterate()
	for it.Next(&rawMatch, &rawVal) {
		if rawVal != 0 {
			t.Errorf("affinity match %+v has value %d, want 0", rawMatch, rawVal)
		}
	}
	must(t, it.Err())
	must(t, m.DeleteAffinityMatch(1, 9))
	must(t, m.DeleteAffinityMatch(1, 9)) // idempotent
	gotMatches, err = m.AffinityMatches()
	must(t, err)
	delete(matches, AffinityMatch{1, 9})
	if !maps.Equal(gotMatches, matches) {
		t.Fatalf("after delete: AffinityMatches() = %v, want %v", gotMatches, matches)
	}

	// Raw layout: the port is in network order, the address v4-mapped.
	var raw sockBackend
	must(t, m.backends.Lookup(uint32(7), &raw))
	if raw.Addr != netip.MustParseAddr("::ffff:10.244.1.2").As16() || raw.Port != netPort(8080) {
		t.Fatalf("raw backend 7 = %+v", raw)
	}
	b := [2]byte{}
	binary.NativeEndian.PutUint16(b[:], raw.Port)
	if b != [2]byte{0x1f, 0x90} {
		t.Fatalf("port bytes %x, want network order 1f90", b)
	}

	// Shrinking trims the old slots; growing again works.
	k := ServiceKey{Addr: netip.MustParseAddr("10.96.0.10"), Port: 443, Proto: ProtoTCP}
	must(t, m.UpsertService(k, Service{ID: 1, Backends: []uint32{9}}, 2))
	if n := countSlots(t, m, k); n != 2 { // slot 0 + slot 1
		t.Fatalf("after shrink: %d entries, want 2", n)
	}
	must(t, m.UpsertService(k, Service{ID: 1, Backends: []uint32{9, 7, 8}}, 1))
	gotSvcs, err = m.Services()
	must(t, err)
	if got := gotSvcs[k].Backends; !reflect.DeepEqual(got, []uint32{9, 7, 8}) {
		t.Fatalf("after grow: backends %v", got)
	}

	// Deletes are idempotent and remove every slot.
	must(t, m.DeleteService(k, 3))
	must(t, m.DeleteService(k, 3))
	if n := countSlots(t, m, k); n != 0 {
		t.Fatalf("after delete: %d entries left", n)
	}
	must(t, m.DeleteBackend(7))
	must(t, m.DeleteBackend(7))
	must(t, m.DeleteRevNat(1))
	must(t, m.DeleteRevNat(1))
	gotBes, err = m.Backends()
	must(t, err)
	if _, ok := gotBes[7]; ok {
		t.Fatal("backend 7 still there")
	}
}

func countSlots(t *testing.T, m *LBMaps, k ServiceKey) int {
	t.Helper()
	var key sockSvcKey
	var val sockSvcValue
	n := 0
	it := m.svc.Iterate()
	for it.Next(&key, &val) {
		if serviceKeyFrom(&key) == k {
			n++
		}
	}
	must(t, it.Err())
	return n
}

func TestMapValidation(t *testing.T) {
	m := &LBMaps{} // validation fails before any map is touched
	v4 := netip.MustParseAddr("10.96.0.10")
	for name, err := range map[string]error{
		"backend id 0":        m.UpsertBackend(0, Backend{Addr: v4, Port: 1, Proto: ProtoTCP}),
		"backend no addr":     m.UpsertBackend(1, Backend{Port: 1}),
		"port without proto":  m.UpsertService(ServiceKey{Addr: v4, Port: 80}, Service{ID: 1}, 0),
		"proto without port":  m.UpsertService(ServiceKey{Addr: v4, Proto: ProtoTCP}, Service{ID: 1}, 0),
		"service id 0":        m.UpsertService(ServiceKey{Addr: v4, Port: 80, Proto: ProtoTCP}, Service{}, 0),
		"wildcard backends":   m.UpsertService(ServiceKey{Addr: v4}, Service{Backends: []uint32{1}}, 0),
		"backend 0 in slot":   m.UpsertService(ServiceKey{Addr: v4, Port: 80, Proto: ProtoTCP}, Service{ID: 1, Backends: []uint32{0}}, 0),
		"zone":                m.UpsertRevNat(1, RevNat{Addr: netip.MustParseAddr("fe80::1%lo"), Port: 1}),
		"unknown scope":       m.DeleteService(ServiceKey{Addr: v4, Port: 80, Proto: ProtoTCP, Scope: 7}, 0),
		"too many backends":   m.UpsertService(ServiceKey{Addr: v4, Port: 80, Proto: ProtoTCP}, Service{ID: 1, Backends: make([]uint32, maxSlots+1)}, 0),
		"revnat service id 0": m.UpsertRevNat(0, RevNat{Addr: v4, Port: 1}),
		"match service id 0":  m.UpsertAffinityMatch(0, 1),
		"match backend id 0":  m.UpsertAffinityMatch(1, 0),
		"delete match id 0":   m.DeleteAffinityMatch(0, 1),
		"cidr invalid":        m.SetServiceCIDRs([]netip.Prefix{{}}),
		"cidr host bits":      m.SetServiceCIDRs([]netip.Prefix{netip.MustParsePrefix("10.96.0.1/16")}),
		"cidr default v4":     m.SetServiceCIDRs([]netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")}),
		"cidr default v6":     m.SetServiceCIDRs([]netip.Prefix{netip.MustParsePrefix("::/0")}),
		"cidr v4-mapped":      m.SetServiceCIDRs([]netip.Prefix{netip.MustParsePrefix("::ffff:10.96.0.0/112")}),
		"cidr covers v4":      m.SetServiceCIDRs([]netip.Prefix{netip.MustParsePrefix("::/64")}),
		"too many cidrs":      m.SetServiceCIDRs(manyCIDRs(MaxServiceCIDRs + 1)),
	} {
		if err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}

func TestPortByteOrder(t *testing.T) {
	for _, p := range []uint16{0, 1, 53, 80, 8080, 65535} {
		if hostPort(netPort(p)) != p {
			t.Errorf("round trip of %d", p)
		}
		var b [2]byte
		binary.NativeEndian.PutUint16(b[:], netPort(p))
		if binary.BigEndian.Uint16(b[:]) != p {
			t.Errorf("netPort(%d) is not network order in memory", p)
		}
	}
}

func TestCgroup2MountFrom(t *testing.T) {
	hybrid := `31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
`
	got, err := cgroup2MountFrom(strings.NewReader(hybrid))
	if err != nil || got != "/sys/fs/cgroup/unified" {
		t.Fatalf("hybrid: %q, %v", got, err)
	}
	escaped := "50 1 0:40 / /run/my\\040cgroup rw - cgroup2 none rw\n"
	got, err = cgroup2MountFrom(strings.NewReader(escaped))
	if err != nil || got != "/run/my cgroup" {
		t.Fatalf("escaped: %q, %v", got, err)
	}
	if _, err := cgroup2MountFrom(strings.NewReader("31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n")); err == nil {
		t.Fatal("no cgroup2 mount: no error")
	}
}

func TestServiceKeyString(t *testing.T) {
	k := ServiceKey{Addr: netip.MustParseAddr("fd6b:7072:96::a"), Port: 53, Proto: ProtoUDP}
	if s := k.String(); s != "[fd6b:7072:96::a]:53/UDP scope 0" {
		t.Errorf("String() = %q", s)
	}
	if s := (ServiceKey{Addr: netip.MustParseAddr("10.96.0.10")}).String(); s != "10.96.0.10/* scope 0" {
		t.Errorf("wildcard String() = %q", s)
	}
}

// manyCIDRs returns n distinct IPv4 /24s.
func manyCIDRs(n int) []netip.Prefix {
	out := make([]netip.Prefix, n)
	for i := range out {
		out[i] = netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 96, byte(i), 0}), 24)
	}
	return out
}

func TestServiceCIDRMap(t *testing.T) {
	m := newUnpinnedMaps(t)
	p := netip.MustParsePrefix
	check := func(what string, want ...netip.Prefix) {
		t.Helper()
		got, err := m.ServiceCIDRs()
		must(t, err)
		if !slices.Equal(got, want) {
			t.Fatalf("%s: ServiceCIDRs() = %v, want %v", what, got, want)
		}
	}
	check("empty")

	// Out of order and with a duplicate; dumps come back sorted, IPv4 first.
	must(t, m.SetServiceCIDRs([]netip.Prefix{p("fd6b:7072:96::/112"), p("10.96.0.0/16"), p("10.96.0.0/16")}))
	check("dual-stack", p("10.96.0.0/16"), p("fd6b:7072:96::/112"))
	must(t, m.SetServiceCIDRs([]netip.Prefix{p("fd6b:7072:96::/112"), p("10.96.0.0/16")})) // idempotent
	check("again", p("10.96.0.0/16"), p("fd6b:7072:96::/112"))

	// Raw layout: IPv4 is v4-mapped with 96 more bits.
	var key sockSvcCidrKey
	var val uint8
	var raw []sockSvcCidrKey
	it := m.svcCIDRs.Iterate()
	for it.Next(&key, &val) {
		raw = append(raw, key)
	}
	must(t, it.Err())
	want4 := sockSvcCidrKey{Prefixlen: 112, Addr: netip.MustParseAddr("::ffff:10.96.0.0").As16()}
	if !slices.Contains(raw, want4) {
		t.Fatalf("raw keys %+v, want %+v among them", raw, want4)
	}

	// Replacing: a narrower IPv4 CIDR and a second one, IPv6 removed.
	must(t, m.SetServiceCIDRs([]netip.Prefix{p("10.96.0.0/24"), p("172.30.0.0/16")}))
	check("replaced", p("10.96.0.0/24"), p("172.30.0.0/16"))

	// A rejected set changes nothing.
	if err := m.SetServiceCIDRs([]netip.Prefix{p("10.97.0.0/16"), p("10.98.0.1/16")}); err == nil {
		t.Fatal("a prefix with host bits was accepted")
	}
	check("after a rejected set", p("10.96.0.0/24"), p("172.30.0.0/16"))

	must(t, m.SetServiceCIDRs(manyCIDRs(MaxServiceCIDRs)))
	got, err := m.ServiceCIDRs()
	must(t, err)
	if len(got) != MaxServiceCIDRs {
		t.Fatalf("%d CIDRs, want %d", len(got), MaxServiceCIDRs)
	}

	must(t, m.SetServiceCIDRs(nil))
	check("cleared")
}

// TestBatchWritesStopAtTheFirstFailure fills the backend map (256 entries here) with one
// batch that does not fit: what was written is reported and readable, the error names the
// map and the first backend that did not fit, and an invalid backend writes nothing.
func TestBatchWritesStopAtTheFirstFailure(t *testing.T) {
	m := newUnpinnedMaps(t)
	ids := make([]uint32, 300)
	bs := make([]Backend, 300)
	for i := range ids {
		ids[i] = uint32(i + 1)
		bs[i] = Backend{netip.AddrFrom4([4]byte{10, 244, byte(i >> 8), byte(i)}), 8080, ProtoTCP}
	}
	n, err := m.UpsertBackends(ids, bs)
	if n != 256 || err == nil || !strings.Contains(err.Error(), sockMapKprBackendsV1+"[257]") {
		t.Fatalf("UpsertBackends of 300 into 256 entries = %d, %v; want 256 and an error naming backend 257", n, err)
	}
	got, err := m.Backends()
	must(t, err)
	if len(got) != 256 || got[256] != bs[255] || got[1] != bs[0] {
		t.Fatalf("after the partial batch the map holds %d backends (1: %v, 256: %v)", len(got), got[1], got[256])
	}

	m = newUnpinnedMaps(t)
	n, err = m.UpsertBackends([]uint32{1, 2}, []Backend{bs[0], {Port: 1}})
	if n != 0 || err == nil || !strings.Contains(err.Error(), "backend 2") {
		t.Fatalf("UpsertBackends with an invalid second backend = %d, %v; want 0 and an error naming backend 2", n, err)
	}
	if got, _ := m.Backends(); len(got) != 0 {
		t.Fatalf("an invalid backend in the batch still wrote %v", got)
	}
}
