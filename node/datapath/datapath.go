// Package datapath turns desired frontends into load-balancer map entries. It keeps a mirror of
// what is programmed, allocates stable service and backend IDs (restored from the pinned maps on
// start, so a restart rewrites nothing), and applies only differences, in make-before-break
// order: backends, reverse NAT, affinity match entries, service slots, then removals.
package datapath

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"

	v1 "k8s.io/api/core/v1"

	"github.com/kpr-dev/kpr/bpf"
	"github.com/kpr-dev/kpr/node/lbstate"
	"github.com/kpr-dev/kpr/node/maglev"
)

// LBMap is the datapath's load-balancer state: implemented by bpf.LBMaps, by Fake (in memory)
// and by Faulty (fault injection around another LBMap).
type LBMap interface {
	// UpsertBackends writes ids[i] = bs[i] and returns how many, from the start, it wrote.
	UpsertBackends(ids []uint32, bs []bpf.Backend) (int, error)
	DeleteBackend(id uint32) error
	UpsertService(k bpf.ServiceKey, s bpf.Service, prevCount int) error
	DeleteService(k bpf.ServiceKey, count int) error
	UpsertRevNat(id uint32, r bpf.RevNat) error
	DeleteRevNat(id uint32) error
	Services() (map[bpf.ServiceKey]bpf.Service, error)
	Backends() (map[uint32]bpf.Backend, error)
	RevNats() (map[uint32]bpf.RevNat, error)
	// Affinity match entries: a frontend with session affinity (svc_id) may keep sending a
	// client to a remembered backend only while the pair exists. Backend IDs are shared
	// between Services, so the backend's existence alone does not say it still serves this
	// one.
	UpsertAffinityMatch(svcID, backendID uint32) error
	DeleteAffinityMatch(svcID, backendID uint32) error
	AffinityMatches() (map[bpf.AffinityMatch]struct{}, error)
	// Walks call fn with one entry at a time until it returns false: a full sync checks the
	// maps against the mirror without a second copy of either.
	WalkServiceSlots(fn func(bpf.ServiceSlot) bool) error
	WalkBackends(fn func(id uint32, b bpf.Backend) bool) error
	WalkAffinityMatches(fn func(bpf.AffinityMatch) bool) error
}

// MaglevMap holds a Maglev lookup table per external frontend (bpf.NodePortMaps).
type MaglevMap interface {
	MaglevTableSize() int
	SetMaglevTable(svcID uint32, table []uint32) error
	DeleteMaglevTable(svcID uint32) error
	MaglevServices() ([]uint32, error)
}

// SourceRangeMap holds the loadBalancerSourceRanges of external frontends (bpf.NodePortMaps).
type SourceRangeMap interface {
	AddSourceRange(bpf.SourceRange) error
	DeleteSourceRange(bpf.SourceRange) error
	WalkSourceRanges(fn func(bpf.SourceRange) bool) error
}

// maxID bounds service and backend IDs; 0 is never used so a zero value means "none".
const maxID = 1<<24 - 1

// Proto converts a Kubernetes protocol to the datapath's.
func Proto(p v1.Protocol) bpf.Proto {
	switch p {
	case v1.ProtocolUDP:
		return bpf.ProtoUDP
	case v1.ProtocolSCTP:
		return bpf.ProtoSCTP
	}
	return bpf.ProtoTCP
}

// Key converts a frontend key to the datapath's service key.
func Key(k lbstate.FrontendKey) bpf.ServiceKey {
	return bpf.ServiceKey{Addr: k.Addr, Port: k.Port, Proto: Proto(k.Protocol), Scope: bpf.Scope(k.Scope)}
}

// wildcard is the entry that marks addr as a VIP in scope, so ports it does not serve are
// refused instead of leaving the node untranslated.
func wildcard(addr netip.Addr, scope bpf.Scope) bpf.ServiceKey {
	return bpf.ServiceKey{Addr: addr, Scope: scope}
}

// IsWildcard reports whether k is a marker rather than a frontend: a VIP's wildcard entry or
// an echo marker (bpf.ServiceKey.Marker).
func IsWildcard(k bpf.ServiceKey) bool { return k.Marker() }

// echoMarker is the marker that makes the tc program answer ping to fe's address, if fe
// earns one: an external-scope ExternalIP or LoadBalancer frontend with backends.
func echoMarker(fe lbstate.Frontend) (bpf.ServiceKey, bool) {
	if fe.Scope != lbstate.ScopeExternal || (fe.Type != lbstate.ExternalIP && fe.Type != lbstate.LoadBalancer) || len(fe.Backends) == 0 {
		return bpf.ServiceKey{}, false
	}
	return bpf.EchoMarker(fe.Addr), true
}

// backendKey identifies a backend. It holds no pointer (netip.Addr does), so the maps keyed
// by it, 100,000 entries at scale, cost the garbage collector nothing to scan.
type backendKey struct {
	addr  [16]byte // IPv4-mapped for IPv4
	port  uint16
	proto bpf.Proto
}

func newBackendKey(ap netip.AddrPort, proto bpf.Proto) backendKey {
	return backendKey{addr: ap.Addr().As16(), port: ap.Port(), proto: proto}
}

// entry is one desired or programmed service-map entry, without its service ID. In the
// mirror of programmed entries, backends is nil: the slots are kept as IDs (programmedEntry.ids),
// a tenth of the memory at 100,000 backends.
type entry struct {
	flags    bpf.ServiceFlags
	affinity uint32
	backends []backendKey
	// ranges are the client prefixes an external frontend with FlagSourceRanges serves,
	// sorted. Like backends, nil in the mirror: programmed ranges live in Reconciler.ranges.
	ranges []netip.Prefix
	owner  string // namespace/name of the Service; "" for wildcards
}

// backendState is what the mirror knows about one programmed backend.
type backendState struct {
	key  backendKey
	refs int32 // slots naming it
}

// Reconciler programs frontends into an LBMap. It is not safe for concurrent use; the agent's
// sync loop is its only caller.
type Reconciler struct {
	lb LBMap

	// desired, by owning Service.
	desired map[string][]lbstate.Frontend
	// owners indexes desired by service-map key: the Services that want each frontend
	// (normally one; the smallest name wins a conflict). wildcards counts, per VIP marker,
	// the desired frontends whose address it marks. Both are kept by Set, so a Sync examines
	// only the keys of the Services that changed.
	owners    map[bpf.ServiceKey][]string
	wildcards map[bpf.ServiceKey]int

	// mirror of the kernel state.
	programmed map[bpf.ServiceKey]programmedEntry
	svcIDs     idAllocator
	backendIDs idAllocator
	backends   map[backendKey]uint32
	byID       map[uint32]backendState
	// matches mirrors the affinity match entries: svc_id -> backend IDs.
	matches map[uint32]map[uint32]bool

	// full forces the next Sync to re-read the maps and diff everything (after a failure).
	full bool
	// check makes the next Sync a full one (Resync): the maps are compared with the mirror
	// and re-read only if they differ.
	check bool

	// Maglev tables of external frontends with backends, when enabled (UseMaglev): tables
	// holds the svc_ids that have one.
	maglev     MaglevMap
	maglevSeed maglev.Seed
	tables     map[uint32]bool

	// loadBalancerSourceRanges of external frontends, when the north-south datapath is
	// loaded (UseSourceRanges): ranges mirrors the map, by svc_id, each sorted.
	srcRanges SourceRangeMap
	ranges    map[uint32][]netip.Prefix
}

// UseSourceRanges makes external frontends with loadBalancerSourceRanges serve only those
// clients, through m. It takes effect at the next Sync, which re-reads the maps.
func (r *Reconciler) UseSourceRanges(m SourceRangeMap) {
	r.srcRanges = m
	r.full = true
}

// addRanges writes the prefixes of want that svcID does not have yet.
func (r *Reconciler) addRanges(svcID uint32, want []netip.Prefix) error {
	for _, p := range want {
		if _, ok := slices.BinarySearchFunc(r.ranges[svcID], p, comparePrefixes); ok {
			continue
		}
		if err := r.srcRanges.AddSourceRange(bpf.SourceRange{SvcID: svcID, Prefix: p}); err != nil {
			return err
		}
		r.setRange(svcID, p, true)
	}
	return nil
}

// dropRanges deletes the prefixes of svcID that keep does not have.
func (r *Reconciler) dropRanges(svcID uint32, keep []netip.Prefix) error {
	for _, p := range slices.Clone(r.ranges[svcID]) {
		if _, ok := slices.BinarySearchFunc(keep, p, comparePrefixes); ok {
			continue
		}
		if err := r.srcRanges.DeleteSourceRange(bpf.SourceRange{SvcID: svcID, Prefix: p}); err != nil {
			return err
		}
		r.setRange(svcID, p, false)
	}
	return nil
}

func (r *Reconciler) setRange(svcID uint32, p netip.Prefix, present bool) {
	have := r.ranges[svcID]
	i, ok := slices.BinarySearchFunc(have, p, comparePrefixes)
	switch {
	case present && !ok:
		r.ranges[svcID] = slices.Insert(slices.Clone(have), i, p)
	case !present && ok:
		if len(have) == 1 {
			delete(r.ranges, svcID)
		} else {
			r.ranges[svcID] = slices.Delete(slices.Clone(have), i, i+1)
		}
	}
}

// pruneRanges deletes the source ranges of svc_ids no programmed frontend has. Only valid
// right after restore.
func (r *Reconciler) pruneRanges() error {
	return r.pruneIDs(slices.Collect(maps.Keys(r.ranges)), func(id uint32) error { return r.dropRanges(id, nil) })
}

// pruneIDs calls drop, in ID order, for each of ids that no programmed frontend has.
func (r *Reconciler) pruneIDs(ids []uint32, drop func(uint32) error) error {
	if len(ids) == 0 {
		return nil
	}
	live := make(map[uint32]bool, len(r.programmed))
	for _, pe := range r.programmed {
		live[pe.id] = true
	}
	var errs []error
	slices.Sort(ids)
	for _, id := range ids {
		if !live[id] {
			errs = append(errs, drop(id))
		}
	}
	return errors.Join(errs...)
}

func comparePrefixes(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return a.Bits() - b.Bits()
}

// sourceRanges is fe's source ranges as the datapath holds them: masked, sorted, unique.
func sourceRanges(fe lbstate.Frontend) []netip.Prefix {
	out := make([]netip.Prefix, 0, len(fe.LoadBalancerSourceRanges))
	for _, p := range fe.LoadBalancerSourceRanges {
		if !p.IsValid() {
			continue
		}
		a := p.Addr().Unmap()
		bits := p.Bits()
		if p.Addr().Is4In6() {
			bits = max(bits-96, 0)
		}
		out = append(out, netip.PrefixFrom(a.WithZone(""), bits).Masked())
	}
	slices.SortFunc(out, comparePrefixes)
	return slices.Compact(out)
}

// UseMaglev makes every external frontend with backends get a Maglev table in m, built with
// seed, so that a flow picks the same backend on every node. It takes effect at the next Sync,
// which re-reads the maps.
func (r *Reconciler) UseMaglev(m MaglevMap, seed maglev.Seed) {
	r.maglev, r.maglevSeed = m, seed
	r.full = true
}

// needsTable reports whether the frontend at k, programmed with ids, gets a Maglev table.
func (r *Reconciler) needsTable(k bpf.ServiceKey, ids []uint32) bool {
	return r.maglev != nil && k.Scope == bpf.ScopeExternal && !IsWildcard(k) && len(ids) > 0
}

// writeTable builds and writes the Maglev table of svcID over the backends bks (with IDs ids).
// Backends are placed by their address, port and protocol, which every node knows alike.
func (r *Reconciler) writeTable(svcID uint32, bks []backendKey, ids []uint32) error {
	cands := make([]maglev.Backend, len(bks))
	for i, bk := range bks {
		cands[i] = maglev.Backend{Name: netip.AddrPortFrom(netip.AddrFrom16(bk.addr).Unmap(), bk.port).String() + "/" + ProtoName(bk.proto), Weight: 1}
	}
	idx, err := maglev.Table(cands, r.maglev.MaglevTableSize(), r.maglevSeed)
	if err != nil {
		return fmt.Errorf("maglev table: %w", err)
	}
	table := make([]uint32, len(idx))
	for i, j := range idx {
		table[i] = ids[j]
	}
	if err := r.maglev.SetMaglevTable(svcID, table); err != nil {
		return err
	}
	r.tables[svcID] = true
	return nil
}

// pruneTables deletes the Maglev tables of svc_ids no programmed frontend has (left by a crash
// between writes, or by a frontend removed while kpr was not running). Only valid right after
// restore.
func (r *Reconciler) pruneTables() error {
	return r.pruneIDs(slices.Collect(maps.Keys(r.tables)), r.dropTable)
}

func (r *Reconciler) dropTable(svcID uint32) error {
	if !r.tables[svcID] {
		return nil
	}
	if err := r.maglev.DeleteMaglevTable(svcID); err != nil {
		return err
	}
	delete(r.tables, svcID)
	return nil
}

type programmedEntry struct {
	id    uint32
	count int
	// ids are the backend IDs in the slots, in slot order.
	ids []uint32
	entry
}

// NewReconciler restores IDs and the mirror from what lb already holds (pinned maps survive
// restarts), so the first sync only writes real differences.
func NewReconciler(lb LBMap) (*Reconciler, error) {
	r := &Reconciler{lb: lb, desired: map[string][]lbstate.Frontend{}, owners: map[bpf.ServiceKey][]string{}, wildcards: map[bpf.ServiceKey]int{}}
	if err := r.restore(); err != nil {
		return nil, err
	}
	// A stale pair only costs a client its affinity once more; failing to delete one is no
	// reason not to start. The first Sync, now a full one, retries and reports it.
	if err := r.pruneMatches(); err != nil {
		r.full = true
	}
	return r, nil
}

// restore rebuilds the mirror from the maps. It streams them: the frontends in one walk of the
// service map and their slots in a second, so no dump of a map is ever held beside the mirror.
func (r *Reconciler) restore() error {
	// The old mirror is about to be replaced; letting it go first keeps the peak at one copy.
	r.programmed, r.backends, r.byID, r.matches, r.ranges = nil, nil, nil, nil, nil
	r.tables = map[uint32]bool{}
	if r.maglev != nil {
		ids, err := r.maglev.MaglevServices()
		if err != nil {
			return fmt.Errorf("reading maglev map: %w", err)
		}
		for _, id := range ids {
			r.tables[id] = true
		}
	}
	r.ranges = map[uint32][]netip.Prefix{}
	if r.srcRanges != nil {
		if err := r.srcRanges.WalkSourceRanges(func(sr bpf.SourceRange) bool {
			r.ranges[sr.SvcID] = append(r.ranges[sr.SvcID], sr.Prefix)
			return true
		}); err != nil {
			return fmt.Errorf("reading source range map: %w", err)
		}
		for id, ps := range r.ranges {
			slices.SortFunc(ps, comparePrefixes)
			r.ranges[id] = slices.Compact(ps)
		}
	}
	r.matches = map[uint32]map[uint32]bool{}
	if err := r.lb.WalkAffinityMatches(func(am bpf.AffinityMatch) bool {
		r.setMatch(am.SvcID, am.BackendID, true)
		return true
	}); err != nil {
		return fmt.Errorf("reading affinity match map: %w", err)
	}
	r.svcIDs = newIDAllocator()
	r.backendIDs = newIDAllocator()
	r.backends = map[backendKey]uint32{}
	r.byID = map[uint32]backendState{}
	if err := r.lb.WalkBackends(func(id uint32, b bpf.Backend) bool {
		k := newBackendKey(netip.AddrPortFrom(b.Addr.Unmap(), b.Port), b.Proto)
		r.byID[id] = backendState{key: k}
		r.backendIDs.reserve(id)
		if _, dup := r.backends[k]; !dup {
			// Two IDs for one backend (a crash mid-update): keep the first, the other is
			// collected once nothing references it.
			r.backends[k] = id
		}
		return true
	}); err != nil {
		return fmt.Errorf("reading backend map: %w", err)
	}
	r.programmed = map[bpf.ServiceKey]programmedEntry{}
	if err := r.lb.WalkServiceSlots(func(s bpf.ServiceSlot) bool {
		if s.Slot == 0 {
			r.programmed[s.Key] = programmedEntry{id: s.ID, count: int(s.Count), ids: make([]uint32, s.Count),
				entry: entry{flags: s.Flags, affinity: s.AffinityTimeoutSec}}
		}
		return true
	}); err != nil {
		return fmt.Errorf("reading service map: %w", err)
	}
	// A slot that is missing, or beyond its frontend's count, leaves ID 0, which never matches
	// a desired backend, so the next write replaces it.
	if err := r.lb.WalkServiceSlots(func(s bpf.ServiceSlot) bool {
		if pe, ok := r.programmed[s.Key]; ok && s.Slot > 0 && int(s.Slot) <= pe.count {
			pe.ids[s.Slot-1] = s.BackendID
		}
		return true
	}); err != nil {
		return fmt.Errorf("reading service map: %w", err)
	}
	for _, pe := range r.programmed {
		for i, id := range pe.ids {
			st, ok := r.byID[id]
			if !ok {
				pe.ids[i] = 0
				continue
			}
			st.refs++
			r.byID[id] = st
		}
		if pe.id != 0 {
			r.svcIDs.reserve(pe.id)
		}
	}
	return nil
}

// verify reports whether the maps hold exactly what the mirror says: every frontend, slot,
// backend and affinity pair, and which frontends have a Maglev table. It reads one entry at a
// time and keeps only counters, so the hourly full sync costs no memory when nothing drifted.
func (r *Reconciler) verify() (bool, error) {
	same := true
	var fronts, slots int
	if err := r.lb.WalkServiceSlots(func(s bpf.ServiceSlot) bool {
		pe, ok := r.programmed[s.Key]
		switch {
		case !ok:
			same = false
		case s.Slot == 0:
			same = pe.id == s.ID && pe.flags == s.Flags && pe.affinity == s.AffinityTimeoutSec && pe.count == int(s.Count)
			fronts++
		case int(s.Slot) <= pe.count:
			same = pe.ids[s.Slot-1] == s.BackendID
			slots++
		}
		// Slots beyond the count are never read by the datapath, and restore ignores them.
		return same
	}); err != nil || !same {
		return false, err
	}
	total := 0
	for _, pe := range r.programmed {
		total += pe.count
	}
	if fronts != len(r.programmed) || slots != total {
		return false, nil
	}
	n := 0
	if err := r.lb.WalkBackends(func(id uint32, b bpf.Backend) bool {
		st, ok := r.byID[id]
		same = ok && st.key == newBackendKey(netip.AddrPortFrom(b.Addr.Unmap(), b.Port), b.Proto)
		n++
		return same
	}); err != nil || !same || n != len(r.byID) {
		return false, err
	}
	n, total = 0, 0
	if err := r.lb.WalkAffinityMatches(func(am bpf.AffinityMatch) bool {
		same = r.matches[am.SvcID][am.BackendID]
		n++
		return same
	}); err != nil || !same {
		return false, err
	}
	for _, m := range r.matches {
		total += len(m)
	}
	if n != total {
		return false, nil
	}
	if r.srcRanges != nil {
		n, total = 0, 0
		if err := r.srcRanges.WalkSourceRanges(func(sr bpf.SourceRange) bool {
			_, same = slices.BinarySearchFunc(r.ranges[sr.SvcID], sr.Prefix, comparePrefixes)
			n++
			return same
		}); err != nil || !same {
			return false, err
		}
		for _, ps := range r.ranges {
			total += len(ps)
		}
		if n != total {
			return false, nil
		}
	}
	if r.maglev != nil {
		ids, err := r.maglev.MaglevServices()
		if err != nil {
			return false, fmt.Errorf("reading maglev map: %w", err)
		}
		if len(ids) != len(r.tables) {
			return false, nil
		}
		for _, id := range ids {
			if !r.tables[id] {
				return false, nil
			}
		}
	}
	return true, nil
}

// repairRevNats makes the reverse NAT map hold exactly one entry per programmed frontend, its
// address and port under its svc_id: a missing or wrong entry would make replies and
// getpeername() show the backend instead of the Service, a stale one is garbage.
func (r *Reconciler) repairRevNats() (int, error) {
	have, err := r.lb.RevNats()
	if err != nil {
		return 0, err
	}
	fixed := 0
	var errs []error
	for k, pe := range r.programmed {
		if IsWildcard(k) || pe.id == 0 {
			continue
		}
		want := bpf.RevNat{Addr: k.Addr, Port: k.Port}
		got, ok := have[pe.id]
		delete(have, pe.id)
		if ok && got == want {
			continue
		}
		if err := r.lb.UpsertRevNat(pe.id, want); err != nil {
			errs = append(errs, fmt.Errorf("frontend %s: %w", keyString(k), err))
			continue
		}
		fixed++
	}
	for _, id := range slices.Sorted(maps.Keys(have)) {
		if err := r.lb.DeleteRevNat(id); err != nil {
			errs = append(errs, err)
			continue
		}
		fixed++
	}
	return fixed, errors.Join(errs...)
}

// Set records the desired frontends of one Service (namespace/name); nil or empty removes it.
// Nothing is written until Sync.
func (r *Reconciler) Set(service string, fes []lbstate.Frontend) {
	if old, ok := r.desired[service]; ok && slices.EqualFunc(old, fes, lbstate.Frontend.Equal) {
		return
	}
	for _, fe := range r.desired[service] {
		k := Key(fe.FrontendKey)
		if o := r.owners[k]; len(o) == 1 && o[0] == service {
			delete(r.owners, k)
		} else if i := slices.Index(o, service); i >= 0 {
			r.owners[k] = slices.Delete(slices.Clone(o), i, i+1)
		}
		if fe.Type.OwnsAddress() {
			w := wildcard(k.Addr, k.Scope)
			if r.wildcards[w]--; r.wildcards[w] <= 0 {
				delete(r.wildcards, w)
			}
		}
		if m, ok := echoMarker(fe); ok {
			if r.wildcards[m]--; r.wildcards[m] <= 0 {
				delete(r.wildcards, m)
			}
		}
	}
	if len(fes) == 0 {
		delete(r.desired, service)
		return
	}
	r.desired[service] = fes
	for _, fe := range fes {
		k := Key(fe.FrontendKey)
		if o := r.owners[k]; !slices.Contains(o, service) {
			o = append(slices.Clone(o), service)
			slices.Sort(o)
			r.owners[k] = o
		}
		// Only a ClusterIP belongs to its Service entirely; a NodePort, external or
		// load-balancer address may be the node's own or shared, and its other ports must
		// keep working.
		if fe.Type.OwnsAddress() {
			r.wildcards[wildcard(k.Addr, k.Scope)]++
		}
		if m, ok := echoMarker(fe); ok {
			r.wildcards[m]++
		}
	}
}

// Programmed is the number of service-map frontends in the mirror (as Stats.Frontends).
func (r *Reconciler) Programmed() int { return len(r.programmed) }

// Services returns the names of the Services with desired frontends.
func (r *Reconciler) Services() []string {
	out := make([]string, 0, len(r.desired))
	for s := range r.desired {
		out = append(out, s)
	}
	slices.Sort(out)
	return out
}

// Stats describes one Sync.
type Stats struct {
	Frontends, Backends int // programmed after the sync
	Upserted, Deleted   int // service-map frontends written and removed
	Full                bool
	// Drift: a full sync found the maps different from what kpr had programmed (changed by
	// someone else, or left by a failed write) and re-read them. RevNatsFixed counts the
	// reverse NAT entries it rewrote or removed.
	Drift        bool
	RevNatsFixed int
}

// Sync makes the maps hold exactly the desired state. touched lists the Services that changed
// since the last successful sync; nil means all of them. A failure leaves every Service either
// as it was or as desired (never half-programmed) and makes the next Sync a full one.
func (r *Reconciler) Sync(touched []string) (Stats, error) {
	st := Stats{Full: touched == nil || r.full || r.check}
	var errs []error
	if st.Full && !r.full {
		same, err := r.verify()
		if err != nil {
			return st, err
		}
		st.Drift = !same
	}
	if r.full || st.Drift {
		if err := r.restore(); err != nil {
			r.full = true
			return st, err
		}
		if err := r.pruneMatches(); err != nil {
			errs = append(errs, err)
		}
		if err := r.pruneTables(); err != nil {
			errs = append(errs, err)
		}
		if err := r.pruneRanges(); err != nil {
			errs = append(errs, err)
		}
	}
	// Keys to examine: everything on a full sync, else what the touched Services want now or
	// owned before, and the VIP markers of those addresses.
	var keys []bpf.ServiceKey
	if st.Full {
		keys = make([]bpf.ServiceKey, 0, len(r.owners)+len(r.wildcards))
		for k := range r.owners {
			keys = append(keys, k)
		}
		for k := range r.wildcards {
			keys = append(keys, k)
		}
		for k := range r.programmed {
			if !r.wanted(k) {
				keys = append(keys, k)
			}
		}
	} else {
		seen := map[bpf.ServiceKey]bool{}
		add := func(k bpf.ServiceKey) {
			if !seen[k] {
				seen[k] = true
				keys = append(keys, k)
			}
			if !IsWildcard(k) {
				if w := wildcard(k.Addr, k.Scope); !seen[w] {
					seen[w] = true
					keys = append(keys, w)
				}
				if k.Scope == bpf.ScopeExternal {
					if m := bpf.EchoMarker(k.Addr); !seen[m] {
						seen[m] = true
						keys = append(keys, m)
					}
				}
			}
		}
		touchedSet := make(map[string]bool, len(touched))
		for _, s := range touched {
			touchedSet[s] = true
			for _, fe := range r.desired[s] {
				add(Key(fe.FrontendKey))
			}
		}
		for k, pe := range r.programmed {
			if touchedSet[pe.owner] {
				add(k)
			}
		}
	}
	// Upserts before deletes, so that a frontend moving between Services never disappears.
	slices.SortFunc(keys, compareKeys)
	for _, k := range keys {
		e, ok := r.want(k)
		if !ok {
			continue
		}
		changed, err := r.upsert(k, e)
		if err != nil {
			errs = append(errs, fmt.Errorf("frontend %s: %w", keyString(k), err))
			continue
		}
		if changed {
			st.Upserted++
		}
	}
	for _, k := range keys {
		if r.wanted(k) {
			continue
		}
		if _, ok := r.programmed[k]; !ok {
			continue
		}
		if err := r.remove(k); err != nil {
			errs = append(errs, fmt.Errorf("frontend %s: %w", keyString(k), err))
			continue
		}
		st.Deleted++
	}
	if st.Full {
		n, err := r.repairRevNats()
		st.RevNatsFixed = n
		if err != nil {
			errs = append(errs, err)
		}
	}
	if err := r.collectBackends(); err != nil {
		errs = append(errs, err)
	}
	r.check = false
	r.full = len(errs) > 0
	st.Frontends = len(r.programmed)
	st.Backends = len(r.backends)
	return st, errors.Join(errs...)
}

// wanted reports whether some desired frontend, or VIP marker, is k.
func (r *Reconciler) wanted(k bpf.ServiceKey) bool {
	if IsWildcard(k) {
		return r.wildcards[k] > 0
	}
	return len(r.owners[k]) > 0
}

// want is the desired service-map entry for k, if any: a VIP marker while some desired
// frontend owns its address, else the entry of the first Service that wants k.
func (r *Reconciler) want(k bpf.ServiceKey) (entry, bool) {
	if IsWildcard(k) {
		return entry{}, r.wildcards[k] > 0
	}
	owners := r.owners[k]
	if len(owners) == 0 {
		return entry{}, false
	}
	owner := owners[0]
	for _, fe := range r.desired[owner] {
		if Key(fe.FrontendKey) != k {
			continue
		}
		e := entry{affinity: fe.AffinityTimeoutSec, owner: owner, flags: bpf.ServiceFlags(0).WithType(uint8(fe.Type))}
		if len(fe.Backends) == 0 && fe.NoBackends == lbstate.Unreachable {
			e.flags |= bpf.FlagUnreachable
		}
		// Only the tc programs read it; in the socket scope the client's address is always
		// kept, and the flag would only make a restart rewrite every entry.
		if fe.PreserveClientIP && k.Scope == bpf.ScopeExternal {
			e.flags |= bpf.FlagPreserveClientIP
		}
		if fe.DSR && k.Scope == bpf.ScopeExternal {
			e.flags |= bpf.FlagDSR
		}
		// The socket scope does not enforce them yet (docs/kube-proxy-differences.md).
		if r.srcRanges != nil && k.Scope == bpf.ScopeExternal && len(fe.LoadBalancerSourceRanges) > 0 {
			e.ranges = sourceRanges(fe)
			e.flags |= bpf.FlagSourceRanges
		}
		e.backends = make([]backendKey, 0, len(fe.Backends))
		for _, b := range fe.Backends {
			e.backends = append(e.backends, newBackendKey(b, k.Proto))
		}
		return e, true
	}
	return entry{}, false
}

// unchanged reports whether the programmed entry already is e.
func (r *Reconciler) unchanged(pe programmedEntry, e entry) bool {
	if pe.flags != e.flags || pe.affinity != e.affinity || len(pe.ids) != len(e.backends) {
		return false
	}
	if !slices.Equal(r.ranges[pe.id], e.ranges) {
		return false
	}
	for i, bk := range e.backends {
		if id, ok := r.backends[bk]; !ok || id != pe.ids[i] {
			return false
		}
	}
	return true
}

func (r *Reconciler) upsert(k bpf.ServiceKey, e entry) (bool, error) {
	pe, exists := r.programmed[k]
	if exists && r.unchanged(pe, e) {
		pe.owner = e.owner
		r.programmed[k] = pe
		// Restored from maps whose table is missing (a crash, or Maglev just enabled), or a
		// table left where random selection is now wanted.
		if r.needsTable(k, pe.ids) && !r.tables[pe.id] {
			if err := r.writeTable(pe.id, e.backends, pe.ids); err != nil {
				return false, err
			}
		} else if !r.needsTable(k, pe.ids) && r.tables[pe.id] {
			if err := r.dropTable(pe.id); err != nil {
				return false, err
			}
		}
		// The slots are right, but the pairs may not be: restored from maps written by a kpr
		// that crashed between writes, or that did not have them yet.
		if e.affinity > 0 && !IsWildcard(k) {
			if err := r.addMatches(pe.id, pe.ids); err != nil {
				return false, err
			}
			return false, r.dropMatches(pe.id, pe.ids)
		}
		return false, r.dropMatches(pe.id, nil)
	}
	// New backends first, so no slot ever names a backend the datapath cannot find.
	if err := r.ensureBackends(e.backends); err != nil {
		return false, err
	}
	ids := make([]uint32, len(e.backends))
	for i, bk := range e.backends {
		ids[i] = r.backends[bk]
	}
	id := pe.id
	if !exists || id == 0 {
		var err error
		if id, err = r.svcIDs.alloc(); err != nil {
			return false, err
		}
	}
	if !IsWildcard(k) && (!exists || pe.id == 0) {
		if err := r.lb.UpsertRevNat(id, bpf.RevNat{Addr: k.Addr, Port: k.Port}); err != nil {
			if !exists {
				r.svcIDs.release(id)
			}
			return false, err
		}
	}
	// The Maglev table before the slots: a new flow finds either the old slots and old table
	// or the new table, and every backend either names exists by now.
	if r.needsTable(k, ids) {
		if err := r.writeTable(id, e.backends, ids); err != nil {
			if !exists {
				r.svcIDs.release(id)
			}
			return false, err
		}
	}
	// The pairs of new backends before any slot names them: a client sent there by a slot
	// must find its affinity honoured on the next connect. Also when affinity is being turned
	// off: until slot 0 is rewritten, readers still see it on.
	var keep []uint32
	if (e.affinity > 0 || pe.affinity > 0) && !IsWildcard(k) {
		if err := r.addMatches(id, ids); err != nil {
			return false, err
		}
	}
	if e.affinity > 0 && !IsWildcard(k) {
		keep = ids
	}
	// New source ranges before slot 0 turns them on or relies on them.
	if len(e.ranges) > 0 {
		if err := r.addRanges(id, e.ranges); err != nil {
			if !exists {
				r.svcIDs.release(id)
			}
			return false, err
		}
	}
	ranges := e.ranges
	svc := bpf.Service{ID: id, Flags: e.flags, AffinityTimeoutSec: e.affinity, Backends: ids}
	if err := r.lb.UpsertService(k, svc, pe.count); err != nil {
		// The slots may be partly written; slot 0 still describes the old, complete state
		// or the new one. The failure makes the next Sync re-read the maps, which rewrites it.
		return false, err
	}
	r.addRefs(pe.ids, -1)
	r.addRefs(ids, 1)
	e.backends, e.ranges = nil, nil
	r.programmed[k] = programmedEntry{id: id, count: len(ids), ids: ids, entry: e}
	// Prefixes no longer allowed, only now that slot 0 says what applies.
	if len(r.ranges[id]) > 0 {
		if err := r.dropRanges(id, ranges); err != nil {
			return true, err
		}
	}
	if !r.needsTable(k, ids) {
		// No backends left (slot 0 refuses new flows without reading the table), or not an
		// external frontend: the table goes after the slots.
		if err := r.dropTable(id); err != nil {
			return true, err
		}
	}
	// Pairs of backends the frontend no longer has, only now that no slot names them. Until
	// then a client may still be pinned to one, which is what make-before-break promises.
	if err := r.dropMatches(id, keep); err != nil {
		return true, err
	}
	return true, nil
}

func (r *Reconciler) remove(k bpf.ServiceKey) error {
	pe := r.programmed[k]
	if err := r.lb.DeleteService(k, pe.count); err != nil {
		return err
	}
	if !IsWildcard(k) && pe.id != 0 {
		if err := r.lb.DeleteRevNat(pe.id); err != nil {
			return err
		}
	}
	// Before the ID can be handed to another frontend.
	if err := r.dropMatches(pe.id, nil); err != nil {
		return err
	}
	if len(r.ranges[pe.id]) > 0 {
		if err := r.dropRanges(pe.id, nil); err != nil {
			return err
		}
	}
	if err := r.dropTable(pe.id); err != nil {
		return err
	}
	if pe.id != 0 {
		r.svcIDs.release(pe.id)
	}
	r.addRefs(pe.ids, -1)
	delete(r.programmed, k)
	return nil
}

// ensureBackends gives every backend in bks an ID and writes the new ones, in one batch.
func (r *Reconciler) ensureBackends(bks []backendKey) error {
	var ids []uint32
	var news []backendKey
	var vals []bpf.Backend
	undo := func(from int) {
		for i := from; i < len(ids); i++ {
			delete(r.backends, news[i])
			r.backendIDs.release(ids[i])
		}
	}
	for _, bk := range bks {
		if _, ok := r.backends[bk]; ok {
			continue
		}
		id, err := r.backendIDs.alloc()
		if err != nil {
			undo(0)
			return err
		}
		r.backends[bk] = id // also skips a repeat of bk
		ids = append(ids, id)
		news = append(news, bk)
		vals = append(vals, bpf.Backend{Addr: netip.AddrFrom16(bk.addr).Unmap(), Port: bk.port, Proto: bk.proto})
	}
	if len(ids) == 0 {
		return nil
	}
	n, err := r.lb.UpsertBackends(ids, vals)
	// The written ones stay mirrored even if a later one failed: unreferenced, they are
	// deleted at the end of the sync like any other.
	for i := range n {
		r.byID[ids[i]] = backendState{key: news[i]}
	}
	undo(n)
	return err
}

func (r *Reconciler) addRefs(ids []uint32, delta int32) {
	for _, id := range ids {
		if st, ok := r.byID[id]; ok {
			st.refs += delta
			r.byID[id] = st
		}
	}
}

// collectBackends deletes backends no slot references any more, last, so a reader that found
// a slot a moment ago still finds its backend.
func (r *Reconciler) collectBackends() error {
	var errs []error
	for id, st := range r.byID {
		if st.refs > 0 {
			continue
		}
		if err := r.lb.DeleteBackend(id); err != nil {
			errs = append(errs, fmt.Errorf("backend %d: %w", id, err))
			continue
		}
		delete(r.byID, id)
		r.backendIDs.release(id)
		if r.backends[st.key] == id {
			delete(r.backends, st.key)
		}
	}
	return errors.Join(errs...)
}

func (r *Reconciler) setMatch(svcID, backendID uint32, present bool) {
	if present {
		if r.matches[svcID] == nil {
			r.matches[svcID] = map[uint32]bool{}
		}
		r.matches[svcID][backendID] = true
		return
	}
	delete(r.matches[svcID], backendID)
	if len(r.matches[svcID]) == 0 {
		delete(r.matches, svcID)
	}
}

// addMatches writes the affinity match entries of svcID for ids that are not there yet.
func (r *Reconciler) addMatches(svcID uint32, ids []uint32) error {
	for _, bid := range ids {
		if bid == 0 || r.matches[svcID][bid] {
			continue
		}
		if err := r.lb.UpsertAffinityMatch(svcID, bid); err != nil {
			return fmt.Errorf("affinity match %d/%d: %w", svcID, bid, err)
		}
		r.setMatch(svcID, bid, true)
	}
	return nil
}

// dropMatches deletes the affinity match entries of svcID except those of keep.
func (r *Reconciler) dropMatches(svcID uint32, keep []uint32) error {
	have := r.matches[svcID]
	if len(have) == 0 {
		return nil
	}
	kept := make(map[uint32]bool, len(keep))
	for _, bid := range keep {
		kept[bid] = true
	}
	for _, bid := range slices.Sorted(maps.Keys(have)) {
		if kept[bid] {
			continue
		}
		if err := r.lb.DeleteAffinityMatch(svcID, bid); err != nil {
			return fmt.Errorf("affinity match %d/%d: %w", svcID, bid, err)
		}
		r.setMatch(svcID, bid, false)
	}
	return nil
}

// pruneMatches deletes the affinity match entries that no programmed frontend justifies (one
// per slot of a frontend with affinity): left by a crash or a failed write, or by a frontend
// removed while kpr was not running. Only valid right after restore, when the mirror is what
// the maps hold; the frontends' next writes add what is missing.
func (r *Reconciler) pruneMatches() error {
	justified := map[uint32][]uint32{}
	for k, pe := range r.programmed {
		if pe.affinity > 0 && !IsWildcard(k) && pe.id != 0 {
			justified[pe.id] = append(justified[pe.id], pe.ids...)
		}
	}
	var errs []error
	for _, svcID := range slices.Sorted(maps.Keys(r.matches)) {
		if err := r.dropMatches(svcID, justified[svcID]); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func compareKeys(a, b bpf.ServiceKey) int {
	if c := a.Addr.Compare(b.Addr); c != 0 {
		return c
	}
	if a.Port != b.Port {
		return int(a.Port) - int(b.Port)
	}
	if a.Proto != b.Proto {
		return int(a.Proto) - int(b.Proto)
	}
	return int(a.Scope) - int(b.Scope)
}

func keyString(k bpf.ServiceKey) string {
	if IsWildcard(k) {
		return k.Addr.String() + " (any port)"
	}
	return fmt.Sprintf("%s/%s", netip.AddrPortFrom(k.Addr, k.Port), ProtoName(k.Proto))
}

// ProtoName is the lower-case name of a datapath protocol.
func ProtoName(p bpf.Proto) string {
	switch p {
	case bpf.ProtoTCP:
		return "tcp"
	case bpf.ProtoUDP:
		return "udp"
	case bpf.ProtoSCTP:
		return "sctp"
	case bpf.ProtoICMP:
		return "icmp"
	case bpf.ProtoICMPv6:
		return "icmpv6"
	case 0:
		return "any"
	}
	return fmt.Sprintf("proto-%d", p)
}

// idAllocator hands out small, stable IDs, reusing released ones. A bitmap: 100,000 IDs take
// 12 KiB instead of a few MiB of map.
type idAllocator struct {
	used []uint64
	next uint32
}

func newIDAllocator() idAllocator { return idAllocator{next: 1} }

func (a *idAllocator) isUsed(id uint32) bool {
	w := int(id / 64)
	return w < len(a.used) && a.used[w]&(1<<(id%64)) != 0
}

func (a *idAllocator) reserve(id uint32) {
	w := int(id / 64)
	if w >= len(a.used) {
		a.used = append(a.used, make([]uint64, w+1-len(a.used))...)
	}
	a.used[w] |= 1 << (id % 64)
}

func (a *idAllocator) release(id uint32) {
	if w := int(id / 64); w < len(a.used) {
		a.used[w] &^= 1 << (id % 64)
	}
}

func (a *idAllocator) alloc() (uint32, error) {
	for range maxID {
		id := a.next
		a.next++
		if a.next > maxID {
			a.next = 1
		}
		if !a.isUsed(id) {
			a.reserve(id)
			return id, nil
		}
	}
	return 0, errors.New("no free ID: every ID up to 2^24 is in use")
}

// Resync makes the next Sync a full one: it checks the maps against what was programmed,
// re-reads them if anything differs, and corrects whatever differs from the desired state,
// whoever changed it.
func (r *Reconciler) Resync() { r.check = true }
