package datapath

import (
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"

	v1 "k8s.io/api/core/v1"

	"github.com/kpr-dev/kpr/bpf"
	"github.com/kpr-dev/kpr/node/lbstate"
	"github.com/kpr-dev/kpr/node/maglev"
)

func fe(vip string, port uint16, proto v1.Protocol, backends ...string) lbstate.Frontend {
	f := lbstate.Frontend{FrontendKey: lbstate.FrontendKey{Addr: netip.MustParseAddr(vip), Port: port, Protocol: proto}}
	for _, b := range backends {
		f.Backends = append(f.Backends, netip.MustParseAddrPort(b))
	}
	return f
}

// sticky is f with sessionAffinity: ClientIP.
func sticky(f lbstate.Frontend) lbstate.Frontend {
	f.AffinityTimeoutSec = lbstate.DefaultAffinityTimeoutSec
	return f
}

// programmed renders what the LBMap holds as "frontend -> sorted backends" lines, as a
// datapath reader would resolve them. It also checks that the affinity match entries are
// exactly one per slot of each frontend with affinity: none missing, none left over.
func programmed(t *testing.T, m LBMap) map[string][]string {
	t.Helper()
	svcs, err := m.Services()
	if err != nil {
		t.Fatal(err)
	}
	bes, err := m.Backends()
	if err != nil {
		t.Fatal(err)
	}
	revs, err := m.RevNats()
	if err != nil {
		t.Fatal(err)
	}
	ams, err := m.AffinityMatches()
	if err != nil {
		t.Fatal(err)
	}
	wantAMs := map[bpf.AffinityMatch]struct{}{}
	out := map[string][]string{}
	for k, s := range svcs {
		var bs []string
		for _, id := range s.Backends {
			b, ok := bes[id]
			if !ok {
				t.Fatalf("%s names missing backend %d", keyString(k), id)
			}
			bs = append(bs, netip.AddrPortFrom(b.Addr, b.Port).String()+"/"+ProtoName(b.Proto))
		}
		slices.Sort(bs)
		if s.Flags&bpf.FlagUnreachable != 0 {
			bs = append(bs, "UNREACHABLE")
		}
		if s.AffinityTimeoutSec > 0 {
			bs = append(bs, fmt.Sprintf("AFFINITY=%ds", s.AffinityTimeoutSec))
			for _, id := range s.Backends {
				wantAMs[bpf.AffinityMatch{SvcID: s.ID, BackendID: id}] = struct{}{}
			}
		}
		if !IsWildcard(k) {
			r, ok := revs[s.ID]
			if !ok || r.Addr != k.Addr || r.Port != k.Port {
				t.Fatalf("%s: reverse NAT %d is %+v (present %v)", keyString(k), s.ID, r, ok)
			}
		}
		out[keyString(k)] = bs
	}
	if !maps.Equal(ams, wantAMs) {
		t.Fatalf("affinity match entries %v, want one per slot of each frontend with affinity: %v", ams, wantAMs)
	}
	return out
}

func mustSync(t *testing.T, r *Reconciler, touched []string) Stats {
	t.Helper()
	st, err := r.Sync(touched)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// freshlySynced is what a new reconciler on empty maps programs for state in one full sync:
// the reference an incremental or retried sync must end up equal to.
func freshlySynced(t *testing.T, state map[string][]lbstate.Frontend) *Fake {
	t.Helper()
	m := NewFake()
	r, _ := NewReconciler(m)
	for n, fes := range state {
		r.Set(n, fes)
	}
	mustSync(t, r, nil)
	return m
}

func TestReconcilerProgramsAndRemoves(t *testing.T) {
	m := NewFake()
	r, err := NewReconciler(m)
	if err != nil {
		t.Fatal(err)
	}
	r.Set("default/web", []lbstate.Frontend{
		fe("10.96.0.10", 80, v1.ProtocolTCP, "10.244.1.2:8080", "10.244.1.3:8080"),
		fe("10.96.0.10", 53, v1.ProtocolUDP),
	})
	r.Set("default/dns", []lbstate.Frontend{fe("10.96.0.20", 53, v1.ProtocolUDP, "10.244.1.2:53")})
	mustSync(t, r, nil)
	got := programmed(t, m)
	want := map[string][]string{
		"10.96.0.10:80/tcp":     {"10.244.1.2:8080/tcp", "10.244.1.3:8080/tcp"},
		"10.96.0.10:53/udp":     nil,
		"10.96.0.10 (any port)": nil,
		"10.96.0.20:53/udp":     {"10.244.1.2:53/udp"},
		"10.96.0.20 (any port)": nil,
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("programmed:\n%v\nwant:\n%v", got, want)
	}

	// Removing one backend touches only that frontend and trims its slot.
	r.Set("default/web", []lbstate.Frontend{
		fe("10.96.0.10", 80, v1.ProtocolTCP, "10.244.1.3:8080"),
		fe("10.96.0.10", 53, v1.ProtocolUDP),
	})
	st := mustSync(t, r, []string{"default/web"})
	if st.Upserted != 1 || st.Deleted != 0 {
		t.Fatalf("stats %+v, want exactly one frontend rewritten", st)
	}
	if n := m.Slots(); n != 2 {
		t.Fatalf("%d backend slots left, want 2", n)
	}
	if bes, _ := m.Backends(); len(bes) != 2 {
		t.Fatalf("backends %v: the unreferenced one was not collected", bes)
	}

	// Deleting a Service removes its frontends, wildcard and reverse NAT.
	r.Set("default/web", nil)
	mustSync(t, r, []string{"default/web"})
	got = programmed(t, m)
	if len(got) != 2 || got["10.96.0.20:53/udp"] == nil {
		t.Fatalf("after delete: %v", got)
	}
	if revs, _ := m.RevNats(); len(revs) != 1 {
		t.Fatalf("reverse NAT left: %v", revs)
	}
	if len(m.Violations) > 0 {
		t.Fatalf("a reader could have seen a half-programmed frontend: %v", m.Violations)
	}
}

func TestUnreachableFlag(t *testing.T) {
	m := NewFake()
	r, _ := NewReconciler(m)
	f := fe("10.96.0.30", 80, v1.ProtocolTCP)
	f.NoBackends = lbstate.Unreachable
	r.Set("default/local", []lbstate.Frontend{f})
	mustSync(t, r, nil)
	if got := programmed(t, m)["10.96.0.30:80/tcp"]; !slices.Equal(got, []string{"UNREACHABLE"}) {
		t.Fatalf("got %v", got)
	}
}

// A restarted agent restores IDs from the maps and rewrites nothing that did not change.
func TestRestartRewritesNothing(t *testing.T) {
	m := NewFake()
	r, _ := NewReconciler(m)
	state := []lbstate.Frontend{
		fe("10.96.0.10", 80, v1.ProtocolTCP, "10.244.1.2:8080", "10.244.1.3:8080"),
		fe("fd6b:7072:96::a", 80, v1.ProtocolTCP, "[fd6b:7072:244:1::2]:8080"),
		sticky(fe("10.96.0.10", 443, v1.ProtocolTCP, "10.244.1.2:8443", "10.244.1.3:8443")),
	}
	r.Set("default/web", state)
	mustSync(t, r, nil)
	if ams, _ := m.AffinityMatches(); len(ams) != 2 {
		t.Fatalf("affinity match entries %v, want 2", ams)
	}
	before, _ := m.Services()
	writes := m.Writes

	r2, err := NewReconciler(m)
	if err != nil {
		t.Fatal(err)
	}
	r2.Set("default/web", state)
	st := mustSync(t, r2, nil)
	if m.Writes != writes || st.Upserted != 0 || st.Deleted != 0 {
		t.Fatalf("restart wrote %d times (stats %+v)", m.Writes-writes, st)
	}
	after, _ := m.Services()
	if fmt.Sprint(before) != fmt.Sprint(after) {
		t.Fatalf("IDs changed across restart:\n%v\n%v", before, after)
	}
	// A change after the restart reuses the restored backend IDs.
	r2.Set("default/web", state[:1])
	mustSync(t, r2, []string{"default/web"})
	after2, _ := m.Services()
	k := Key(state[0].FrontendKey)
	if !slices.Equal(before[k].Backends, after2[k].Backends) || before[k].ID != after2[k].ID {
		t.Fatalf("IDs of an unchanged frontend moved: %v -> %v", before[k], after2[k])
	}
}

// randomState builds n Services with random backends from a small pool, so backends are
// shared, added and removed between rounds, and session affinity turned on and off.
func randomState(rng *rand.Rand, n int) map[string][]lbstate.Frontend {
	out := map[string][]lbstate.Frontend{}
	for i := range n {
		if rng.IntN(4) == 0 {
			continue
		}
		var bs []string
		for j := range 6 {
			if rng.IntN(2) == 0 {
				bs = append(bs, fmt.Sprintf("10.244.1.%d:8080", j+2))
			}
		}
		f := fe(fmt.Sprintf("10.96.0.%d", i+1), 80, v1.ProtocolTCP, bs...)
		if rng.IntN(2) == 0 {
			f = sticky(f)
		}
		out[fmt.Sprintf("ns/s%d", i)] = []lbstate.Frontend{f}
	}
	return out
}

// Every write order the reconciler uses keeps each frontend complete for a concurrent reader,
// through random sequences of changes; the result always equals a from-scratch programming.
func TestMakeBeforeBreak(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	m := NewFake()
	r, _ := NewReconciler(m)
	for round := range 50 {
		state := randomState(rng, 8)
		var touched []string
		for i := range 8 {
			name := fmt.Sprintf("ns/s%d", i)
			r.Set(name, state[name])
			touched = append(touched, name)
		}
		mustSync(t, r, touched)
		fresh := freshlySynced(t, state)
		if a, b := fmt.Sprint(programmed(t, m)), fmt.Sprint(programmed(t, fresh)); a != b {
			t.Fatalf("round %d: incremental state\n%s\ndiffers from fresh\n%s", round, a, b)
		}
	}
	if len(m.Violations) > 0 {
		t.Fatalf("%d violations, first: %s", len(m.Violations), m.Violations[0])
	}
}

// A write that fails at any point leaves no frontend half-programmed, and the next sync (full,
// because of the failure) converges to the desired state.
func TestFailedWriteIsRetried(t *testing.T) {
	base := map[string][]lbstate.Frontend{
		"ns/a": {fe("10.96.0.1", 80, v1.ProtocolTCP, "10.244.1.2:80", "10.244.1.3:80")},
		"ns/b": {fe("10.96.0.2", 80, v1.ProtocolTCP, "10.244.1.3:80")},
		// Session affinity: pairs to add (new backend), keep, drop (backend left, affinity
		// turned off, frontend removed).
		"ns/s": {sticky(fe("10.96.0.4", 80, v1.ProtocolTCP, "10.244.1.2:80", "10.244.1.3:80"))},
		"ns/t": {sticky(fe("10.96.0.5", 80, v1.ProtocolTCP, "10.244.1.3:80"))},
		"ns/u": {sticky(fe("10.96.0.6", 80, v1.ProtocolTCP, "10.244.1.2:80"))},
	}
	next := map[string][]lbstate.Frontend{
		"ns/a": {fe("10.96.0.1", 80, v1.ProtocolTCP, "10.244.1.4:80")},
		"ns/c": {fe("10.96.0.3", 81, v1.ProtocolUDP, "10.244.1.2:81", "10.244.1.5:81")},
		"ns/s": {sticky(fe("10.96.0.4", 80, v1.ProtocolTCP, "10.244.1.3:80", "10.244.1.4:80"))},
		"ns/u": {fe("10.96.0.6", 80, v1.ProtocolTCP, "10.244.1.2:80")},
		"ns/v": {sticky(fe("10.96.0.7", 81, v1.ProtocolUDP, "10.244.1.5:81"))},
	}
	names := slices.Sorted(maps.Keys(base))
	for n := range next {
		if !slices.Contains(names, n) {
			names = append(names, n)
		}
	}
	failures, matchFailures := 0, 0
	for failAt := 1; failAt < 80; failAt++ {
		fake := NewFake()
		faulty := &Faulty{LBMap: fake}
		r, _ := NewReconciler(faulty)
		for n, f := range base {
			r.Set(n, f)
		}
		mustSync(t, r, nil)
		faulty.writes = 0
		failedOp := ""
		faulty.Fail = func(op string, n int) error {
			if n == failAt {
				failedOp = op
				return errors.New("injected failure in " + op)
			}
			return nil
		}
		for _, n := range names {
			r.Set(n, next[n])
		}
		_, err := r.Sync(names)
		if len(fake.Violations) > 0 {
			t.Fatalf("fail at write %d: %v", failAt, fake.Violations)
		}
		if err == nil {
			continue // the change needed fewer writes than failAt
		}
		failures++
		if strings.Contains(failedOp, "AffinityMatch") {
			matchFailures++
		}
		faulty.Fail = nil
		if _, err := r.Sync([]string{}); err != nil {
			t.Fatalf("fail at write %d: retry: %v", failAt, err)
		}
		want := freshlySynced(t, next)
		if a, b := fmt.Sprint(programmed(t, fake)), fmt.Sprint(programmed(t, want)); a != b {
			t.Fatalf("fail at write %d: after retry\n%s\nwant\n%s", failAt, a, b)
		}
		got, _ := fake.Backends()
		wantBes, _ := want.Backends()
		if len(got) != len(wantBes) {
			t.Fatalf("fail at write %d: backends leaked or lost: %v, want %d", failAt, got, len(wantBes))
		}
	}
	if failures < 20 || matchFailures < 5 {
		t.Fatalf("only %d injected failures hit a write (%d an affinity match); the test exercises too little", failures, matchFailures)
	}
}

// Backend IDs are shared between Services: a backend that leaves a Service with affinity but
// still serves another keeps its ID, so only the match entries tell the datapath that the
// first Service's clients must move on. They follow every change of the frontend.
func TestAffinityMatchesFollowBackends(t *testing.T) {
	m := NewFake()
	r, _ := NewReconciler(m)
	a := sticky(fe("10.96.0.10", 80, v1.ProtocolTCP, "10.244.1.2:8080", "10.244.1.3:8080"))
	b := sticky(fe("10.96.0.11", 80, v1.ProtocolTCP, "10.244.1.2:8080"))
	c := fe("10.96.0.12", 80, v1.ProtocolTCP, "10.244.1.2:8080", "10.244.1.3:8080")
	r.Set("ns/a", []lbstate.Frontend{a})
	r.Set("ns/b", []lbstate.Frontend{b})
	r.Set("ns/c", []lbstate.Frontend{c})
	mustSync(t, r, nil)
	svcs, _ := m.Services()
	bes, _ := m.Backends()
	idA, idB := svcs[Key(a.FrontendKey)].ID, svcs[Key(b.FrontendKey)].ID
	beID := map[string]uint32{}
	for id, be := range bes {
		beID[netip.AddrPortFrom(be.Addr, be.Port).String()] = id
	}
	x, y := beID["10.244.1.2:8080"], beID["10.244.1.3:8080"]
	check := func(step string, want ...bpf.AffinityMatch) {
		t.Helper()
		programmed(t, m) // also: exactly one pair per slot of a frontend with affinity
		got, _ := m.AffinityMatches()
		wantSet := map[bpf.AffinityMatch]struct{}{}
		for _, am := range want {
			wantSet[am] = struct{}{}
		}
		if !maps.Equal(got, wantSet) {
			t.Fatalf("%s: affinity match entries %v, want %v", step, got, wantSet)
		}
		if len(m.Violations) > 0 {
			t.Fatalf("%s: %v", step, m.Violations)
		}
	}
	check("start", bpf.AffinityMatch{SvcID: idA, BackendID: x}, bpf.AffinityMatch{SvcID: idA, BackendID: y}, bpf.AffinityMatch{SvcID: idB, BackendID: x})

	// x leaves A but still serves B (and C): same ID, so only A's pair goes.
	a.Backends = a.Backends[1:]
	r.Set("ns/a", []lbstate.Frontend{a})
	mustSync(t, r, []string{"ns/a"})
	if bes, _ := m.Backends(); bes[x].Port != 8080 {
		t.Fatalf("backend %d went away although B still uses it: %v", x, bes)
	}
	check("x left A", bpf.AffinityMatch{SvcID: idA, BackendID: y}, bpf.AffinityMatch{SvcID: idB, BackendID: x})

	// x comes back to A, then affinity is turned off and on again.
	a.Backends = append(a.Backends, netip.MustParseAddrPort("10.244.1.2:8080"))
	r.Set("ns/a", []lbstate.Frontend{a})
	mustSync(t, r, []string{"ns/a"})
	check("x back in A", bpf.AffinityMatch{SvcID: idA, BackendID: x}, bpf.AffinityMatch{SvcID: idA, BackendID: y}, bpf.AffinityMatch{SvcID: idB, BackendID: x})
	off := a
	off.AffinityTimeoutSec = 0
	r.Set("ns/a", []lbstate.Frontend{off})
	mustSync(t, r, []string{"ns/a"})
	check("affinity off", bpf.AffinityMatch{SvcID: idB, BackendID: x})
	r.Set("ns/a", []lbstate.Frontend{a})
	mustSync(t, r, []string{"ns/a"})
	check("affinity on", bpf.AffinityMatch{SvcID: idA, BackendID: x}, bpf.AffinityMatch{SvcID: idA, BackendID: y}, bpf.AffinityMatch{SvcID: idB, BackendID: x})

	// Removing a Service removes its pairs before its ID can be handed out again.
	r.Set("ns/a", nil)
	mustSync(t, r, []string{"ns/a"})
	check("A removed", bpf.AffinityMatch{SvcID: idB, BackendID: x})
	r.Set("ns/b", nil)
	mustSync(t, r, []string{"ns/b"})
	check("B removed")
}

// The Fake's reader check is what proves the order above; make sure it would notice a slot
// written before its pair.
func TestFakeNoticesSlotWithoutAffinityMatch(t *testing.T) {
	m := NewFake()
	k := bpf.ServiceKey{Addr: netip.MustParseAddr("10.96.0.10"), Port: 80, Proto: bpf.ProtoTCP}
	if err := m.UpsertBackend(1, bpf.Backend{Addr: netip.MustParseAddr("10.244.1.2"), Port: 80, Proto: bpf.ProtoTCP}); err != nil {
		t.Fatal(err)
	}
	if err := m.UpsertService(k, bpf.Service{ID: 1, AffinityTimeoutSec: 10, Backends: []uint32{1}}, 0); err != nil {
		t.Fatal(err)
	}
	if len(m.Violations) == 0 {
		t.Fatal("a slot without an affinity match entry went unnoticed")
	}
}

// Restoring (at start, and on the full sync after a failure) deletes the pairs no
// programmed frontend justifies and re-adds missing ones without rewriting any frontend.
func TestRestoreCleansAffinityMatches(t *testing.T) {
	m := NewFake()
	faulty := &Faulty{LBMap: m}
	r, _ := NewReconciler(faulty)
	state := map[string][]lbstate.Frontend{
		"ns/a": {sticky(fe("10.96.0.10", 80, v1.ProtocolTCP, "10.244.1.2:8080", "10.244.1.3:8080"))},
		"ns/b": {fe("10.96.0.11", 80, v1.ProtocolTCP, "10.244.1.2:8080")},
	}
	for n, f := range state {
		r.Set(n, f)
	}
	mustSync(t, r, nil)
	svcs, _ := m.Services()
	idA, idB := svcs[Key(state["ns/a"][0].FrontendKey)].ID, svcs[Key(state["ns/b"][0].FrontendKey)].ID
	legit, _ := m.AffinityMatches()
	if len(legit) != 2 {
		t.Fatalf("affinity match entries %v, want 2", legit)
	}
	missing := slices.SortedFunc(maps.Keys(legit), func(a, b bpf.AffinityMatch) int { return int(a.BackendID) - int(b.BackendID) })[0]

	// What a crash or an old kpr can leave: pairs of a backend not in the slots, of a
	// frontend without affinity, of no frontend; and a missing pair.
	damage := func() {
		t.Helper()
		for _, am := range []bpf.AffinityMatch{{SvcID: idA, BackendID: 999}, {SvcID: idB, BackendID: missing.BackendID}, {SvcID: 777, BackendID: 1}} {
			if err := m.UpsertAffinityMatch(am.SvcID, am.BackendID); err != nil {
				t.Fatal(err)
			}
		}
		if err := m.DeleteAffinityMatch(missing.SvcID, missing.BackendID); err != nil {
			t.Fatal(err)
		}
	}
	damage()

	r2, err := NewReconciler(faulty)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := m.AffinityMatches()
	wantNow := maps.Clone(legit)
	delete(wantNow, missing)
	if !maps.Equal(got, wantNow) {
		t.Fatalf("after restore: affinity match entries %v, want the stale ones gone: %v", got, wantNow)
	}
	for n, f := range state {
		r2.Set(n, f)
	}
	writes := m.Writes
	st := mustSync(t, r2, nil)
	if st.Upserted != 0 || m.Writes != writes+1 {
		t.Fatalf("re-adding the missing pair wrote %d times (stats %+v), want once and no frontend", m.Writes-writes, st)
	}
	programmed(t, m)

	// The same on the full sync that follows a failure.
	faulty.Fail = func(op string, _ int) error { return errors.New("injected failure in " + op) }
	r2.Set("ns/b", []lbstate.Frontend{fe("10.96.0.11", 80, v1.ProtocolTCP, "10.244.1.4:8080")})
	if _, err := r2.Sync([]string{"ns/b"}); err == nil {
		t.Fatal("sync with every write failing succeeded")
	}
	faulty.Fail = nil
	damage()
	st = mustSync(t, r2, []string{})
	if !st.Full || st.Upserted != 1 {
		t.Fatalf("retry stats %+v, want a full sync that rewrites only ns/b", st)
	}
	programmed(t, m)
}

// Unserved ports of a NodePort address (the node's own IP) must stay reachable: no wildcard.
func TestNoWildcardForSharedAddresses(t *testing.T) {
	m := NewFake()
	r, _ := NewReconciler(m)
	np := fe("198.18.0.11", 30080, v1.ProtocolTCP, "10.244.1.2:8080")
	np.Type = lbstate.NodePort
	r.Set("default/web", []lbstate.Frontend{np, fe("10.96.0.10", 80, v1.ProtocolTCP, "10.244.1.2:8080")})
	mustSync(t, r, nil)
	got := programmed(t, m)
	if _, ok := got["198.18.0.11 (any port)"]; ok {
		t.Fatalf("a NodePort address got a wildcard entry: %v", got)
	}
	if _, ok := got["10.96.0.10 (any port)"]; !ok {
		t.Fatalf("the ClusterIP lost its wildcard entry: %v", got)
	}
}

// Incremental syncs that name only the Services whose frontends changed end where a fresh
// full programming does, also when Services share addresses (their VIP marker) and even
// frontend keys (the first Service by name wins, whichever changed last).
func TestIncrementalSyncMatchesFull(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	m := NewFake()
	r, _ := NewReconciler(m)
	state := map[string][]lbstate.Frontend{}
	for round := range 200 {
		var touched []string
		for range 1 + rng.IntN(3) {
			name := fmt.Sprintf("ns/s%d", rng.IntN(6))
			var fes []lbstate.Frontend
			for range rng.IntN(3) {
				// Few addresses and ports, so keys and addresses collide between Services.
				f := fe(fmt.Sprintf("10.96.0.%d", 1+rng.IntN(3)), uint16(80+rng.IntN(2)), v1.ProtocolTCP)
				for j := range rng.IntN(3) {
					f.Backends = append(f.Backends, netip.MustParseAddrPort(fmt.Sprintf("10.244.1.%d:8080", 2+j+rng.IntN(3))))
				}
				if slices.ContainsFunc(fes, func(g lbstate.Frontend) bool { return g.FrontendKey == f.FrontendKey }) {
					continue // one Service never lists a frontend twice
				}
				fes = append(fes, f)
			}
			state[name] = fes
			r.Set(name, fes)
			touched = append(touched, name)
		}
		mustSync(t, r, touched)
		fresh := freshlySynced(t, state)
		if a, b := fmt.Sprint(programmed(t, m)), fmt.Sprint(programmed(t, fresh)); a != b {
			t.Fatalf("round %d (touched %v): incremental state\n%s\ndiffers from fresh\n%s", round, touched, a, b)
		}
	}
	if len(m.Violations) > 0 {
		t.Fatalf("%d violations, first: %s", len(m.Violations), m.Violations[0])
	}
}

// memMaglev is an in-memory MaglevMap.
type memMaglev struct {
	size   int
	tables map[uint32][]uint32
	writes int
}

func (m *memMaglev) MaglevTableSize() int { return m.size }
func (m *memMaglev) SetMaglevTable(id uint32, t []uint32) error {
	m.tables[id] = slices.Clone(t)
	m.writes++
	return nil
}
func (m *memMaglev) DeleteMaglevTable(id uint32) error { delete(m.tables, id); m.writes++; return nil }
func (m *memMaglev) MaglevServices() ([]uint32, error) {
	return slices.Sorted(maps.Keys(m.tables)), nil
}

// External frontends with backends get a Maglev table over exactly their backends' IDs, in
// shares within one slot; the table follows the backends, goes with the frontend, survives a
// restart untouched, and is the same on another node whose backend IDs differ.
func TestMaglevTables(t *testing.T) {
	seed, err := maglev.ParseSeed("a3ByLW1hZ2xldi0x")
	if err != nil {
		t.Fatal(err)
	}
	ext := func(f lbstate.Frontend) lbstate.Frontend {
		f.Scope, f.Type = lbstate.ScopeExternal, lbstate.NodePort
		return f
	}
	m, mm := NewFake(), &memMaglev{size: 251, tables: map[uint32][]uint32{}}
	r, _ := NewReconciler(m)
	r.UseMaglev(mm, seed)
	np := ext(fe("198.18.0.11", 30080, v1.ProtocolTCP, "10.244.1.2:8080", "10.244.1.3:8080", "10.244.2.2:8080"))
	r.Set("default/web", []lbstate.Frontend{np, fe("10.96.0.10", 80, v1.ProtocolTCP, "10.244.1.2:8080")})
	mustSync(t, r, nil)
	svcs, _ := m.Services()
	bes, _ := m.Backends()
	id := svcs[Key(np.FrontendKey)].ID
	if len(mm.tables) != 1 || mm.tables[id] == nil {
		t.Fatalf("tables for %v, want one for the NodePort (svc %d) only", slices.Collect(maps.Keys(mm.tables)), id)
	}
	// Resolve the table to backend addresses: each of the three backends in 83 or 84 slots.
	resolve := func(table []uint32, bes map[uint32]bpf.Backend) []string {
		out := make([]string, len(table))
		for i, bid := range table {
			b, ok := bes[bid]
			if !ok {
				t.Fatalf("slot %d names missing backend %d", i, bid)
			}
			out[i] = netip.AddrPortFrom(b.Addr, b.Port).String()
		}
		return out
	}
	names := resolve(mm.tables[id], bes)
	counts := map[string]int{}
	for _, n := range names {
		counts[n]++
	}
	for _, b := range np.Backends {
		if c := counts[b.String()]; c < 83 || c > 84 {
			t.Fatalf("backend %s has %d of 251 slots: %v", b, c, counts)
		}
	}

	// Another node: backend IDs allocated in another order, the same table by address.
	m2, mm2 := NewFake(), &memMaglev{size: 251, tables: map[uint32][]uint32{}}
	r2, _ := NewReconciler(m2)
	r2.UseMaglev(mm2, seed)
	r2.Set("default/other", []lbstate.Frontend{fe("10.96.0.99", 80, v1.ProtocolTCP, "10.244.2.2:8080")})
	mustSync(t, r2, nil)
	np2 := np
	np2.Addr = netip.MustParseAddr("198.18.0.12")
	r2.Set("default/web", []lbstate.Frontend{np2})
	mustSync(t, r2, []string{"default/web"})
	svcs2, _ := m2.Services()
	bes2, _ := m2.Backends()
	if got := resolve(mm2.tables[svcs2[Key(np2.FrontendKey)].ID], bes2); !slices.Equal(got, names) {
		t.Fatal("the other node's table differs")
	}

	// A backend goes: the table is rewritten without it; a restart writes nothing.
	np.Backends = np.Backends[:2]
	r.Set("default/web", []lbstate.Frontend{np})
	mustSync(t, r, []string{"default/web"})
	bes, _ = m.Backends()
	for _, n := range resolve(mm.tables[id], bes) {
		if n == "10.244.2.2:8080" {
			t.Fatal("the removed backend is still in the table")
		}
	}
	writes := mm.writes
	r3, _ := NewReconciler(m)
	r3.UseMaglev(mm, seed)
	r3.Set("default/web", []lbstate.Frontend{np})
	mustSync(t, r3, nil)
	if mm.writes != writes {
		t.Fatalf("a restart wrote %d tables", mm.writes-writes)
	}
	// No backends, then no frontend: no table.
	np.Backends = nil
	r3.Set("default/web", []lbstate.Frontend{np})
	mustSync(t, r3, []string{"default/web"})
	if len(mm.tables) != 0 {
		t.Fatalf("tables %v left for a frontend without backends", mm.tables)
	}
	np.Backends = []netip.AddrPort{netip.MustParseAddrPort("10.244.1.2:8080")}
	r3.Set("default/web", []lbstate.Frontend{np})
	mustSync(t, r3, []string{"default/web"})
	r3.Set("default/web", nil)
	mustSync(t, r3, []string{"default/web"})
	if len(mm.tables) != 0 {
		t.Fatalf("tables %v left after the frontend went", mm.tables)
	}
	if len(m.Violations) > 0 {
		t.Fatalf("violations: %v", m.Violations)
	}
}

// The periodic full sync finds whatever changed the maps behind kpr's back, through the
// comparison with its mirror, and puts back the desired state; with nothing changed it writes
// nothing.
func TestFullSyncCorrectsDrift(t *testing.T) {
	state := map[string][]lbstate.Frontend{
		"default/web": {
			fe("10.96.0.10", 80, v1.ProtocolTCP, "10.244.1.2:8080", "10.244.1.3:8080"),
			sticky(fe("10.96.0.10", 443, v1.ProtocolTCP, "10.244.1.2:8443", "10.244.1.3:8443")),
		},
		"default/dns": {fe("10.96.0.53", 53, v1.ProtocolUDP, "10.244.2.2:53")},
	}
	web := Key(state["default/web"][0].FrontendKey)
	webTLS := Key(state["default/web"][1].FrontendKey)
	dns := Key(state["default/dns"][0].FrontendKey)
	tamper := []struct {
		name string
		do   func(m *Fake, svcs map[bpf.ServiceKey]bpf.Service) error
	}{
		{"slot names another backend", func(m *Fake, s map[bpf.ServiceKey]bpf.Service) error {
			bad := s[web]
			bad.Backends = []uint32{s[dns].Backends[0], bad.Backends[1]}
			return m.UpsertService(web, bad, 2)
		}},
		{"frontend deleted", func(m *Fake, s map[bpf.ServiceKey]bpf.Service) error {
			return m.DeleteService(dns, 1)
		}},
		{"foreign frontend added", func(m *Fake, s map[bpf.ServiceKey]bpf.Service) error {
			k := bpf.ServiceKey{Addr: netip.MustParseAddr("10.96.0.99"), Port: 80, Proto: bpf.ProtoTCP}
			if err := m.UpsertService(k, bpf.Service{ID: 4000, Backends: s[dns].Backends}, 0); err != nil {
				return err
			}
			return m.UpsertRevNat(4000, bpf.RevNat{Addr: k.Addr, Port: 80})
		}},
		{"backend deleted", func(m *Fake, s map[bpf.ServiceKey]bpf.Service) error {
			return m.DeleteBackend(s[dns].Backends[0])
		}},
		{"backend rewritten", func(m *Fake, s map[bpf.ServiceKey]bpf.Service) error {
			return m.UpsertBackend(s[dns].Backends[0], bpf.Backend{Addr: netip.MustParseAddr("10.244.9.9"), Port: 53, Proto: bpf.ProtoUDP})
		}},
		{"affinity timeout changed", func(m *Fake, s map[bpf.ServiceKey]bpf.Service) error {
			bad := s[webTLS]
			bad.AffinityTimeoutSec = 5
			return m.UpsertService(webTLS, bad, 2)
		}},
		{"affinity pair deleted", func(m *Fake, s map[bpf.ServiceKey]bpf.Service) error {
			return m.DeleteAffinityMatch(s[webTLS].ID, s[webTLS].Backends[0])
		}},
		{"stray affinity pair", func(m *Fake, s map[bpf.ServiceKey]bpf.Service) error {
			return m.UpsertAffinityMatch(s[web].ID, s[dns].Backends[0])
		}},
		{"reverse NAT deleted", func(m *Fake, s map[bpf.ServiceKey]bpf.Service) error {
			return m.DeleteRevNat(s[web].ID)
		}},
		{"reverse NAT rewritten", func(m *Fake, s map[bpf.ServiceKey]bpf.Service) error {
			return m.UpsertRevNat(s[dns].ID, bpf.RevNat{Addr: netip.MustParseAddr("10.96.0.1"), Port: 53})
		}},
		{"stale reverse NAT", func(m *Fake, s map[bpf.ServiceKey]bpf.Service) error {
			return m.UpsertRevNat(4001, bpf.RevNat{Addr: netip.MustParseAddr("10.96.0.98"), Port: 80})
		}},
	}
	for _, tc := range tamper {
		t.Run(tc.name, func(t *testing.T) {
			m := NewFake()
			r, _ := NewReconciler(m)
			for n, fes := range state {
				r.Set(n, fes)
			}
			mustSync(t, r, nil)
			want := fmt.Sprint(programmed(t, m))
			wantRevs, _ := m.RevNats()

			// Nothing changed: the full sync only reads.
			writes := m.Writes
			r.Resync()
			if st := mustSync(t, r, []string{}); !st.Full || st.Drift || st.RevNatsFixed != 0 || m.Writes != writes {
				t.Fatalf("full sync of unchanged maps: stats %+v, %d writes", st, m.Writes-writes)
			}

			svcs, _ := m.Services()
			if err := tc.do(m, svcs); err != nil {
				t.Fatal(err)
			}
			st := mustSync(t, r, nil)
			if !st.Drift && st.RevNatsFixed == 0 {
				t.Fatalf("full sync did not notice: %+v", st)
			}
			if got := fmt.Sprint(programmed(t, m)); got != want {
				t.Fatalf("after the full sync the maps hold\n%s\nwant\n%s", got, want)
			}
			if revs, _ := m.RevNats(); len(revs) != len(wantRevs) {
				t.Fatalf("reverse NAT entries %v, want %v", revs, wantRevs)
			}
			// And the next one finds nothing more to do.
			if st := mustSync(t, r, nil); st.Drift || st.RevNatsFixed != 0 || st.Upserted != 0 || st.Deleted != 0 {
				t.Fatalf("second full sync: %+v", st)
			}
		})
	}
}

// externalTrafficPolicy Local: the external-scope frontend is marked for destination-only
// translation; the socket-scope one, which never masquerades anyway, is not.
func TestPreserveClientIPFlag(t *testing.T) {
	m := NewFake()
	r, _ := NewReconciler(m)
	ext := fe("198.18.0.11", 30080, v1.ProtocolTCP, "10.244.1.2:8080")
	ext.Scope, ext.Type, ext.PreserveClientIP = lbstate.ScopeExternal, lbstate.NodePort, true
	sock := ext
	sock.Scope = lbstate.ScopeSocket
	cluster := ext
	cluster.FrontendKey.Port, cluster.PreserveClientIP = 30081, false
	r.Set("default/web", []lbstate.Frontend{ext, sock, cluster})
	mustSync(t, r, nil)
	svcs, _ := m.Services()
	for _, c := range []struct {
		f    lbstate.Frontend
		want bool
	}{{ext, true}, {sock, false}, {cluster, false}} {
		s, ok := svcs[Key(c.f.FrontendKey)]
		if !ok {
			t.Fatalf("%s not programmed", c.f.FrontendKey)
		}
		if got := s.Flags&bpf.FlagPreserveClientIP != 0; got != c.want {
			t.Errorf("%s scope %d: preserve-client-IP flag %v, want %v", c.f.FrontendKey, c.f.Scope, got, c.want)
		}
	}
}

// memRanges is an in-memory SourceRangeMap.
type memRanges struct {
	set    map[bpf.SourceRange]bool
	writes int
}

func (m *memRanges) AddSourceRange(r bpf.SourceRange) error {
	m.set[r] = true
	m.writes++
	return nil
}
func (m *memRanges) DeleteSourceRange(r bpf.SourceRange) error {
	delete(m.set, r)
	m.writes++
	return nil
}
func (m *memRanges) WalkSourceRanges(fn func(bpf.SourceRange) bool) error {
	for r := range m.set {
		if !fn(r) {
			break
		}
	}
	return nil
}

// of lists the prefixes of svcID, sorted.
func (m *memRanges) of(svcID uint32) []string {
	var out []string
	for r := range m.set {
		if r.SvcID == svcID {
			out = append(out, r.Prefix.String())
		}
	}
	slices.Sort(out)
	return out
}

// rangeChecker wraps an LBMap and fails a slot-0 write that turns FlagSourceRanges on for a
// frontend whose prefixes are not all in place yet.
type rangeChecker struct {
	LBMap
	ranges     *memRanges
	want       func(svcID uint32) []string
	violations []string
}

func (c *rangeChecker) UpsertService(k bpf.ServiceKey, s bpf.Service, prev int) error {
	if s.Flags&bpf.FlagSourceRanges != 0 {
		have := c.ranges.of(s.ID)
		for _, p := range c.want(s.ID) {
			if !slices.Contains(have, p) {
				c.violations = append(c.violations, fmt.Sprintf("%s written with FlagSourceRanges before prefix %s (has %v)", keyString(k), p, have))
			}
		}
	}
	return c.LBMap.UpsertService(k, s, prev)
}

// loadBalancerSourceRanges: an external LoadBalancer frontend with ranges gets
// FlagSourceRanges and exactly its prefixes under its svc_id, written before slot 0 and
// removed after it; the socket-scope frontend and one without ranges get neither; a restart
// writes nothing; a prefix deleted behind kpr's back comes back at the next full sync.
func TestSourceRanges(t *testing.T) {
	lb := func(addr string, ranges ...string) lbstate.Frontend {
		f := fe(addr, 443, v1.ProtocolTCP, "10.244.1.2:8443")
		f.Scope, f.Type = lbstate.ScopeExternal, lbstate.LoadBalancer
		for _, s := range ranges {
			f.LoadBalancerSourceRanges = append(f.LoadBalancerSourceRanges, netip.MustParsePrefix(s))
		}
		return f
	}
	fake, mr := NewFake(), &memRanges{set: map[bpf.SourceRange]bool{}}
	var wantNow []string
	chk := &rangeChecker{LBMap: fake, ranges: mr, want: func(uint32) []string { return wantNow }}
	r, _ := NewReconciler(chk)
	r.UseSourceRanges(mr)

	sock := fe("203.0.113.10", 443, v1.ProtocolTCP, "10.244.1.2:8443")
	sock.Type = lbstate.LoadBalancer
	sock.LoadBalancerSourceRanges = []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}
	open := lb("203.0.113.11")
	steps := []struct {
		ranges []string
		want   []string
	}{
		{[]string{"192.0.2.0/24", "198.51.100.7/32", "192.0.2.0/24"}, []string{"192.0.2.0/24", "198.51.100.7/32"}},
		{[]string{"198.51.100.7/32", "198.18.0.0/15"}, []string{"198.18.0.0/15", "198.51.100.7/32"}},
		{nil, nil},
		{[]string{"10.0.0.0/8"}, []string{"10.0.0.0/8"}},
	}
	var id uint32
	for i, st := range steps {
		wantNow = st.want
		f := lb("203.0.113.10", st.ranges...)
		r.Set("default/lb", []lbstate.Frontend{f, sock, open})
		mustSync(t, r, []string{"default/lb"})
		svcs, _ := fake.Services()
		s := svcs[Key(f.FrontendKey)]
		if id == 0 {
			id = s.ID
		}
		if got := mr.of(s.ID); !slices.Equal(got, st.want) {
			t.Fatalf("step %d: prefixes %v, want %v", i, got, st.want)
		}
		if has := s.Flags&bpf.FlagSourceRanges != 0; has != (len(st.want) > 0) {
			t.Fatalf("step %d: FlagSourceRanges %v with prefixes %v", i, has, st.want)
		}
		for _, k := range []lbstate.FrontendKey{sock.FrontendKey, open.FrontendKey} {
			if svcs[Key(k)].Flags&bpf.FlagSourceRanges != 0 {
				t.Fatalf("step %d: %s has FlagSourceRanges", i, keyString(Key(k)))
			}
		}
		if len(mr.set) != len(st.want) {
			t.Fatalf("step %d: the map holds %d prefixes, want %d", i, len(mr.set), len(st.want))
		}
	}
	if len(chk.violations) > 0 {
		t.Fatalf("order: %v", chk.violations)
	}

	// A restart adopts the prefixes and writes nothing.
	writes, fwrites := mr.writes, fake.Writes
	r2, _ := NewReconciler(fake)
	r2.UseSourceRanges(mr)
	r2.Set("default/lb", []lbstate.Frontend{lb("203.0.113.10", "10.0.0.0/8"), sock, open})
	mustSync(t, r2, nil)
	if mr.writes != writes || fake.Writes != fwrites {
		t.Fatalf("a restart wrote %d prefixes and %d service entries", mr.writes-writes, fake.Writes-fwrites)
	}

	// Drift: a prefix deleted and a stray one added behind kpr's back.
	delete(mr.set, bpf.SourceRange{SvcID: id, Prefix: netip.MustParsePrefix("10.0.0.0/8")})
	mr.set[bpf.SourceRange{SvcID: 999, Prefix: netip.MustParsePrefix("0.0.0.0/0")}] = true
	r2.Resync()
	st := mustSync(t, r2, []string{})
	if !st.Drift || !slices.Equal(mr.of(id), []string{"10.0.0.0/8"}) || len(mr.set) != 1 {
		t.Fatalf("after a full sync: drift %v, prefixes %v (%d in all), want the desired one only", st.Drift, mr.of(id), len(mr.set))
	}

	// The frontend goes: its prefixes go with it.
	r2.Set("default/lb", []lbstate.Frontend{sock, open})
	mustSync(t, r2, []string{"default/lb"})
	if len(mr.set) != 0 {
		t.Fatalf("prefixes left after the frontend went: %v", mr.set)
	}
	if len(fake.Violations) > 0 {
		t.Fatal(fake.Violations)
	}
}

// Echo markers: an external-scope ExternalIP or LoadBalancer frontend with backends gets its
// address an ICMP (ICMPv6) echo marker, so the node answers ping there; the marker goes when
// no such frontend with backends is left at the address, and a NodePort, a socket-scope
// frontend or one without backends never makes one.
func TestEchoMarkers(t *testing.T) {
	ext := func(f lbstate.Frontend, typ lbstate.Type) lbstate.Frontend {
		f.Scope, f.Type = lbstate.ScopeExternal, typ
		return f
	}
	m := NewFake()
	r, _ := NewReconciler(m)
	ip4 := ext(fe("198.51.100.10", 80, v1.ProtocolTCP, "10.244.1.2:8080"), lbstate.ExternalIP)
	ip4udp := ext(fe("198.51.100.10", 53, v1.ProtocolUDP, "10.244.1.2:53"), lbstate.ExternalIP)
	lb6 := ext(fe("fd6b:7072:51::20", 80, v1.ProtocolTCP, "[fd6b:7072:244::2]:8080"), lbstate.LoadBalancer)
	np := ext(fe("198.18.0.11", 30080, v1.ProtocolTCP, "10.244.1.2:8080"), lbstate.NodePort)
	sockIP := fe("198.51.100.30", 80, v1.ProtocolTCP, "10.244.1.2:8080")
	sockIP.Type = lbstate.ExternalIP
	empty := ext(fe("198.51.100.40", 80, v1.ProtocolTCP), lbstate.ExternalIP)
	markers := func() []string {
		svcs, _ := m.Services()
		var out []string
		for k := range svcs {
			if k.Marker() && !k.Wildcard() {
				out = append(out, k.String())
			}
		}
		slices.Sort(out)
		return out
	}
	r.Set("default/a", []lbstate.Frontend{ip4, lb6, np, sockIP, empty})
	r.Set("default/b", []lbstate.Frontend{ip4udp})
	mustSync(t, r, nil)
	want := []string{"198.51.100.10/ICMP scope 1", "fd6b:7072:51::20/ICMPv6 scope 1"}
	if got := markers(); !slices.Equal(got, want) {
		t.Fatalf("markers %v, want %v", got, want)
	}
	// a loses its backends; b still serves 198.51.100.10.
	ip4.Backends, lb6.Backends = nil, nil
	r.Set("default/a", []lbstate.Frontend{ip4, lb6, np, sockIP, empty})
	mustSync(t, r, []string{"default/a"})
	if got := markers(); !slices.Equal(got, want[:1]) {
		t.Fatalf("after a lost its backends: markers %v, want %v", got, want[:1])
	}
	r.Set("default/b", nil)
	mustSync(t, r, []string{"default/b"})
	if got := markers(); len(got) != 0 {
		t.Fatalf("after b went: markers %v, want none", got)
	}
	// A restart adopts markers without writing.
	r.Set("default/b", []lbstate.Frontend{ip4udp})
	mustSync(t, r, []string{"default/b"})
	writes := m.Writes
	r2, _ := NewReconciler(m)
	r2.Set("default/a", []lbstate.Frontend{ip4, lb6, np, sockIP, empty})
	r2.Set("default/b", []lbstate.Frontend{ip4udp})
	mustSync(t, r2, nil)
	if m.Writes != writes || !slices.Equal(markers(), want[:1]) {
		t.Fatalf("restart: %d writes, markers %v", m.Writes-writes, markers())
	}
}
