package bpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
)

// LBMaps gives typed access to the load-balancing maps (schema v1). Every
// method is idempotent, so a failed sync can simply be retried.
type LBMaps struct {
	svc        *ebpf.Map
	backends   *ebpf.Map
	revNat     *ebpf.Map
	sockRevNat *ebpf.Map
	// sockPeer is the socket storage of connected UDP sockets' reverse translation; only the
	// kernel writes it.
	sockPeer *ebpf.Map
	// sockConn holds the reverse translation of live TCP and UDP sockets connected to a VIP,
	// a slot each; only the kernel writes it.
	sockConn *ebpf.Map
	// sockRevNatPorts marks the backend ports of sockRevNat's and sockConn's entries; only
	// the kernel writes it, but for seedSockRevNatPorts.
	sockRevNatPorts *ebpf.Map
	affinity        *ebpf.Map
	// affinityMatch holds the (svc_id, backend_id) pairs an affinity entry may
	// name; see UpsertAffinityMatch.
	affinityMatch *ebpf.Map
	// svcCIDRs is the LPM trie of Service CIDRs; see SetServiceCIDRs.
	svcCIDRs *ebpf.Map
	// bindGuard holds what the bind() hooks check; see SetBindGuard.
	bindGuard *ebpf.Map
}

// mapNames lists the pinned maps in a stable order.
var mapNames = []string{
	sockMapKprSvcV1,
	sockMapKprBackendsV1,
	sockMapKprRevnatV1,
	sockMapKprSkRevnatV1,
	sockMapKprSkPeerV1,
	sockMapKprSkConnV1,
	sockMapKprSkRevnatPortsV1,
	sockMapKprAffinityV1,
	sockMapKprAffinityMatchV1,
	sockMapKprSvcCidrsV1,
	sockMapKprBindGuardV1,
}

func newLBMaps(m *sockMaps) *LBMaps {
	return &LBMaps{
		svc:             m.KprSvcV1,
		backends:        m.KprBackendsV1,
		revNat:          m.KprRevnatV1,
		sockRevNat:      m.KprSkRevnatV1,
		sockPeer:        m.KprSkPeerV1,
		sockConn:        m.KprSkConnV1,
		sockRevNatPorts: m.KprSkRevnatPortsV1,
		affinity:        m.KprAffinityV1,
		affinityMatch:   m.KprAffinityMatchV1,
		svcCIDRs:        m.KprSvcCidrsV1,
		bindGuard:       m.KprBindGuardV1,
	}
}

func (m *LBMaps) byName() map[string]**ebpf.Map {
	return map[string]**ebpf.Map{
		sockMapKprSvcV1:           &m.svc,
		sockMapKprBackendsV1:      &m.backends,
		sockMapKprRevnatV1:        &m.revNat,
		sockMapKprSkRevnatV1:      &m.sockRevNat,
		sockMapKprSkPeerV1:        &m.sockPeer,
		sockMapKprSkConnV1:        &m.sockConn,
		sockMapKprSkRevnatPortsV1: &m.sockRevNatPorts,
		sockMapKprAffinityV1:      &m.affinity,
		sockMapKprAffinityMatchV1: &m.affinityMatch,
		sockMapKprSvcCidrsV1:      &m.svcCIDRs,
		sockMapKprBindGuardV1:     &m.bindGuard,
	}
}

// mapLayouts are the key and value sizes the Go side reads and writes,
// derived from the bpf2go types, so a pinned map from another schema is
// rejected instead of misread.
var mapLayouts = map[string][2]int{
	sockMapKprSvcV1:           {binary.Size(sockSvcKey{}), binary.Size(sockSvcValue{})},
	sockMapKprBackendsV1:      {binary.Size(uint32(0)), binary.Size(sockBackend{})},
	sockMapKprRevnatV1:        {binary.Size(uint32(0)), binary.Size(sockRevnat{})},
	sockMapKprSkRevnatV1:      {binary.Size(sockSkRevnatKey{}), binary.Size(sockSkRevnatValue{})},
	sockMapKprSkPeerV1:        {binary.Size(int32(0)), binary.Size(sockSkPeer{})},
	sockMapKprSkConnV1:        {binary.Size(uint32(0)), binary.Size(sockSkConn{})},
	sockMapKprSkRevnatPortsV1: {binary.Size(uint32(0)), binary.Size(uint8(0))},
	sockMapKprAffinityV1:      {binary.Size(sockAffinityKey{}), binary.Size(sockAffinityValue{})},
	sockMapKprAffinityMatchV1: {binary.Size(sockAffinityMatchKey{}), binary.Size(uint8(0))},
	sockMapKprSvcCidrsV1:      {binary.Size(sockSvcCidrKey{}), binary.Size(uint8(0))},
	sockMapKprBindGuardV1:     {binary.Size(uint32(0)), binary.Size(sockBindGuard{})},
}

// OpenMaps opens the maps pinned in pinDir without loading any program, for
// read-mostly users such as `kpr service list` and `kpr status`.
func OpenMaps(pinDir string) (*LBMaps, error) {
	m := &LBMaps{}
	var missing []string
	for _, name := range mapNames {
		mp, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, name), nil)
		if errors.Is(err, os.ErrNotExist) {
			missing = append(missing, name)
			continue
		}
		if err != nil {
			m.Close()
			return nil, fmt.Errorf("open pinned map %s: %w", name, err)
		}
		*m.byName()[name] = mp
		if err := checkLayout(name, mp); err != nil {
			m.Close()
			return nil, err
		}
	}
	switch {
	case len(missing) == len(mapNames):
		return nil, fmt.Errorf("no kpr maps are pinned in %s: the datapath is not loaded (start kpr, or check the pin directory)", pinDir)
	case len(missing) > 0:
		m.Close()
		return nil, fmt.Errorf("pinned maps in %s are incomplete, missing %s: load the datapath again (kpr run) or remove it (kpr cleanup)",
			pinDir, strings.Join(missing, ", "))
	}
	return m, nil
}

func checkLayout(name string, mp *ebpf.Map) error {
	want := mapLayouts[name]
	if int(mp.KeySize()) != want[0] || int(mp.ValueSize()) != want[1] {
		return fmt.Errorf("pinned map %s has key/value size %d/%d, this kpr uses %d/%d: it was created by an incompatible kpr version, remove it with `kpr cleanup`",
			name, mp.KeySize(), mp.ValueSize(), want[0], want[1])
	}
	return nil
}

// Close closes the map file descriptors; pins stay.
func (m *LBMaps) Close() error {
	var errs []error
	for _, name := range mapNames {
		p := m.byName()[name]
		if *p != nil {
			errs = append(errs, (*p).Close())
			*p = nil
		}
	}
	return errors.Join(errs...)
}

func deleteIgnoreMissing(m *ebpf.Map, key any) error {
	if err := m.Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return err
	}
	return nil
}

// UpsertBackend creates or replaces backend id. ID 0 is reserved (it marks a
// missing slot in dumps).
func (m *LBMaps) UpsertBackend(id uint32, b Backend) error {
	_, err := m.UpsertBackends([]uint32{id}, []Backend{b})
	return err
}

// UpsertBackends creates or replaces backends ids[i] = bs[i] with one batch
// write (one system call instead of one per backend: a first sync of 100,000
// backends spends most of its map-writing time entering the kernel). It
// returns how many entries, from the start of ids, are written; on an invalid
// backend nothing is.
func (m *LBMaps) UpsertBackends(ids []uint32, bs []Backend) (int, error) {
	if len(ids) != len(bs) {
		return 0, fmt.Errorf("%d backend IDs for %d backends", len(ids), len(bs))
	}
	vals := make([]sockBackend, len(bs))
	for i, b := range bs {
		if ids[i] == 0 {
			return 0, fmt.Errorf("backend ID 0 is reserved")
		}
		if err := validAddr(b.Addr); err != nil {
			return 0, fmt.Errorf("backend %d: %w", ids[i], err)
		}
		vals[i] = sockBackend{Addr: b.Addr.As16(), Port: netPort(b.Port), Proto: uint8(b.Proto)}
	}
	n, err := batchUpdate(m.backends, ids, vals)
	if err != nil {
		return n, fmt.Errorf("update %s[%d]: %w", sockMapKprBackendsV1, ids[n], err)
	}
	return n, nil
}

// batchUpdate writes keys[i] = vals[i] in order and returns how many are written. One entry
// is written alone (the batch call costs more setup), and a kernel without the batch
// operations for this map type gets one write per entry.
func batchUpdate[K, V any](m *ebpf.Map, keys []K, vals []V) (int, error) {
	if len(keys) > 1 {
		n, err := m.BatchUpdate(keys, vals, nil)
		switch {
		case err == nil:
			return len(keys), nil
		case !errors.Is(err, ebpf.ErrNotSupported):
			return min(n, len(keys)-1), err
		}
	}
	for i := range keys {
		if err := m.Update(&keys[i], &vals[i], ebpf.UpdateAny); err != nil {
			return i, err
		}
	}
	return len(keys), nil
}

// DeleteBackend removes backend id; deleting a missing backend is no error.
func (m *LBMaps) DeleteBackend(id uint32) error {
	if err := deleteIgnoreMissing(m.backends, id); err != nil {
		return fmt.Errorf("delete %s[%d]: %w", sockMapKprBackendsV1, id, err)
	}
	return nil
}

// UpsertService writes the backend slots 1..len(s.Backends) (one batch), then slot 0 with
// the new count, then deletes the slots len(s.Backends)+1..prevCount that the
// previous version of the frontend had. The datapath only reads slots below
// the count it found in slot 0, so it never sees a half-written frontend.
func (m *LBMaps) UpsertService(k ServiceKey, s Service, prevCount int) error {
	if err := k.validate(); err != nil {
		return err
	}
	if s.ID == 0 && !k.Marker() {
		return fmt.Errorf("service %s: service ID 0 is reserved", k)
	}
	if len(s.Backends) > maxSlots {
		return fmt.Errorf("service %s: %d backends, at most %d fit", k, len(s.Backends), maxSlots)
	}
	if k.Marker() && len(s.Backends) > 0 {
		return fmt.Errorf("service %s: a wildcard entry or echo marker has no backends", k)
	}
	for i, id := range s.Backends {
		if id == 0 {
			return fmt.Errorf("service %s: backend ID 0 (slot %d) is reserved", k, i+1)
		}
	}

	if len(s.Backends) > 0 {
		keys := make([]sockSvcKey, len(s.Backends))
		vals := make([]sockSvcValue, len(s.Backends))
		for i, id := range s.Backends {
			keys[i] = svcKey(k, uint16(i+1))
			// In slots 1..count the svc_id field is the backend_id (a C union
			// that bpf2go names after its first member).
			vals[i] = sockSvcValue{SvcId: id}
		}
		if n, err := batchUpdate(m.svc, keys, vals); err != nil {
			return fmt.Errorf("update %s %s slot %d: %w", sockMapKprSvcV1, k, n+1, err)
		}
	}
	key := svcKey(k, 0)
	val := sockSvcValue{
		Count:              uint16(len(s.Backends)),
		Flags:              uint16(s.Flags),
		SvcId:              s.ID,
		AffinityTimeoutSec: s.AffinityTimeoutSec,
	}
	if err := m.svc.Update(&key, &val, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("update %s %s slot 0: %w", sockMapKprSvcV1, k, err)
	}
	for slot := len(s.Backends) + 1; slot <= min(prevCount, maxSlots); slot++ {
		key := svcKey(k, uint16(slot))
		if err := deleteIgnoreMissing(m.svc, &key); err != nil {
			return fmt.Errorf("delete %s %s slot %d: %w", sockMapKprSvcV1, k, slot, err)
		}
	}
	return nil
}

// DeleteService deletes slot 0 first, so the datapath stops using the
// frontend at once, then the backend slots 1..count.
func (m *LBMaps) DeleteService(k ServiceKey, count int) error {
	if err := k.validate(); err != nil {
		return err
	}
	for slot := 0; slot <= min(count, maxSlots); slot++ {
		key := svcKey(k, uint16(slot))
		if err := deleteIgnoreMissing(m.svc, &key); err != nil {
			return fmt.Errorf("delete %s %s slot %d: %w", sockMapKprSvcV1, k, slot, err)
		}
	}
	return nil
}

// UpsertRevNat creates or replaces the reverse NAT entry of svc_id id.
func (m *LBMaps) UpsertRevNat(id uint32, r RevNat) error {
	if id == 0 {
		return fmt.Errorf("service ID 0 is reserved")
	}
	if err := validAddr(r.Addr); err != nil {
		return fmt.Errorf("reverse NAT %d: %w", id, err)
	}
	v := sockRevnat{Addr: r.Addr.As16(), Port: netPort(r.Port)}
	if err := m.revNat.Update(id, &v, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("update %s[%d]: %w", sockMapKprRevnatV1, id, err)
	}
	return nil
}

// DeleteRevNat removes the reverse NAT entry of svc_id id.
func (m *LBMaps) DeleteRevNat(id uint32) error {
	if err := deleteIgnoreMissing(m.revNat, id); err != nil {
		return fmt.Errorf("delete %s[%d]: %w", sockMapKprRevnatV1, id, err)
	}
	return nil
}

// ServiceSlot is one entry of the service map: a frontend's slot 0, or one of its backend
// slots.
type ServiceSlot struct {
	Key  ServiceKey
	Slot uint16 // 0: the frontend; 1..Count: its backends in order
	// Slot 0 only.
	ID                 uint32
	Flags              ServiceFlags
	AffinityTimeoutSec uint32
	Count              uint16
	// Backend slots only: the backend's ID.
	BackendID uint32
}

// WalkServiceSlots calls fn with every entry of the service map, in the map's order, until fn
// returns false. Unlike Services it assembles nothing, so checking the whole map costs no
// memory.
func (m *LBMaps) WalkServiceSlots(fn func(ServiceSlot) bool) error {
	var key sockSvcKey
	var val sockSvcValue
	it := m.svc.Iterate()
	for it.Next(&key, &val) {
		s := ServiceSlot{Key: serviceKeyFrom(&key), Slot: key.Slot}
		if key.Slot == 0 {
			s.ID, s.Flags, s.AffinityTimeoutSec, s.Count = val.SvcId, ServiceFlags(val.Flags), val.AffinityTimeoutSec, val.Count
		} else {
			s.BackendID = val.SvcId // backend_id, see UpsertService
		}
		if !fn(s) {
			return nil
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("dump %s: %w", sockMapKprSvcV1, err)
	}
	return nil
}

// Services dumps the frontends, reassembled from their slots.
func (m *LBMaps) Services() (map[ServiceKey]Service, error) {
	return AssembleServices(m.WalkServiceSlots)
}

// AssembleServices reassembles the frontends from a walk of the service map's slots.
func AssembleServices(walk func(func(ServiceSlot) bool) error) (map[ServiceKey]Service, error) {
	frontends := make(map[ServiceKey]Service)
	slots := make(map[ServiceKey]map[uint16]uint32)
	err := walk(func(s ServiceSlot) bool {
		if s.Slot == 0 {
			frontends[s.Key] = Service{
				ID:                 s.ID,
				Flags:              s.Flags,
				AffinityTimeoutSec: s.AffinityTimeoutSec,
				Backends:           make([]uint32, s.Count),
			}
			return true
		}
		if slots[s.Key] == nil {
			slots[s.Key] = make(map[uint16]uint32)
		}
		slots[s.Key][s.Slot] = s.BackendID
		return true
	})
	if err != nil {
		return nil, err
	}
	for k, s := range frontends {
		if len(s.Backends) == 0 {
			s.Backends = nil
			frontends[k] = s
			continue
		}
		for i := range s.Backends {
			s.Backends[i] = slots[k][uint16(i+1)]
		}
	}
	return frontends, nil
}

// WalkBackends calls fn with every backend until fn returns false.
func (m *LBMaps) WalkBackends(fn func(id uint32, b Backend) bool) error {
	var id uint32
	var val sockBackend
	it := m.backends.Iterate()
	for it.Next(&id, &val) {
		b := Backend{Addr: netip.AddrFrom16(val.Addr).Unmap(), Port: hostPort(val.Port), Proto: Proto(val.Proto)}
		if !fn(id, b) {
			return nil
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("dump %s: %w", sockMapKprBackendsV1, err)
	}
	return nil
}

// Backends dumps the backends by ID.
func (m *LBMaps) Backends() (map[uint32]Backend, error) {
	out := make(map[uint32]Backend)
	err := m.WalkBackends(func(id uint32, b Backend) bool {
		out[id] = b
		return true
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// RevNats dumps the reverse NAT entries by svc_id.
func (m *LBMaps) RevNats() (map[uint32]RevNat, error) {
	out := make(map[uint32]RevNat)
	var id uint32
	var val sockRevnat
	it := m.revNat.Iterate()
	for it.Next(&id, &val) {
		out[id] = RevNat{
			Addr: netip.AddrFrom16(val.Addr).Unmap(),
			Port: hostPort(val.Port),
		}
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("dump %s: %w", sockMapKprRevnatV1, err)
	}
	return out, nil
}

// UpsertAffinityMatch allows affinity entries of svc_id svcID to keep naming backend backendID.
// The datapath reuses a remembered backend only if this pair exists: backend IDs are shared
// between Services, so a backend that left one Service but still serves another must not
// keep receiving the first one's clients. Write the pair before any slot of the frontend
// names the backend, delete it after the last one stopped naming it.
func (m *LBMaps) UpsertAffinityMatch(svcID, backendID uint32) error {
	key, err := affinityMatchKey(svcID, backendID)
	if err != nil {
		return err
	}
	if err := m.affinityMatch.Update(&key, uint8(0), ebpf.UpdateAny); err != nil {
		return fmt.Errorf("update %s[%d,%d]: %w", sockMapKprAffinityMatchV1, svcID, backendID, err)
	}
	return nil
}

// DeleteAffinityMatch removes the pair; deleting a missing pair is no error.
func (m *LBMaps) DeleteAffinityMatch(svcID, backendID uint32) error {
	key, err := affinityMatchKey(svcID, backendID)
	if err != nil {
		return err
	}
	if err := deleteIgnoreMissing(m.affinityMatch, &key); err != nil {
		return fmt.Errorf("delete %s[%d,%d]: %w", sockMapKprAffinityMatchV1, svcID, backendID, err)
	}
	return nil
}

// WalkAffinityMatches calls fn with every (svc_id, backend_id) pair until fn returns false.
func (m *LBMaps) WalkAffinityMatches(fn func(AffinityMatch) bool) error {
	var key sockAffinityMatchKey
	var val uint8
	it := m.affinityMatch.Iterate()
	for it.Next(&key, &val) {
		if !fn(AffinityMatch{SvcID: key.SvcId, BackendID: key.BackendId}) {
			return nil
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("dump %s: %w", sockMapKprAffinityMatchV1, err)
	}
	return nil
}

// AffinityMatches dumps the (svc_id, backend_id) pairs.
func (m *LBMaps) AffinityMatches() (map[AffinityMatch]struct{}, error) {
	out := make(map[AffinityMatch]struct{})
	err := m.WalkAffinityMatches(func(am AffinityMatch) bool {
		out[am] = struct{}{}
		return true
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

func affinityMatchKey(svcID, backendID uint32) (sockAffinityMatchKey, error) {
	if svcID == 0 || backendID == 0 {
		return sockAffinityMatchKey{}, fmt.Errorf("affinity match %d/%d: service and backend ID 0 are reserved", svcID, backendID)
	}
	return sockAffinityMatchKey{SvcId: svcID, BackendId: backendID}, nil
}

// MaxServiceCIDRs is how many Service CIDRs the datapath holds (SVC_CIDR_MAP_SIZE in sock.c).
const MaxServiceCIDRs = 64

// v4MappedSpace is where IPv4 addresses live in the maps' 16-byte form.
var v4MappedSpace = netip.MustParsePrefix("::ffff:0:0/96")

// SetServiceCIDRs makes cidrs the Service CIDRs: a connect() or sendmsg() to an address inside
// one of them that no frontend owns (an unallocated ClusterIP) fails with EHOSTUNREACH, where
// kube-proxy drops the packets. Nil or empty removes them all, and such addresses are left
// untranslated again. The new prefixes are written before the old ones are deleted, so an
// address inside both is refused throughout.
func (m *LBMaps) SetServiceCIDRs(cidrs []netip.Prefix) error {
	want := make(map[sockSvcCidrKey]netip.Prefix, len(cidrs))
	for _, p := range cidrs {
		k, err := svcCIDRKey(p)
		if err != nil {
			return err
		}
		want[k] = p
	}
	if len(want) > MaxServiceCIDRs {
		return fmt.Errorf("service CIDRs: %d given, at most %d fit", len(want), MaxServiceCIDRs)
	}
	have, err := m.serviceCIDRKeys()
	if err != nil {
		return err
	}
	for k, p := range want {
		if _, ok := have[k]; ok {
			continue
		}
		if err := m.svcCIDRs.Update(&k, uint8(0), ebpf.UpdateAny); err != nil {
			return fmt.Errorf("update %s[%s]: %w", sockMapKprSvcCidrsV1, p, err)
		}
	}
	for k := range have {
		if _, ok := want[k]; ok {
			continue
		}
		if err := deleteIgnoreMissing(m.svcCIDRs, &k); err != nil {
			return fmt.Errorf("delete %s[%s]: %w", sockMapKprSvcCidrsV1, prefixFrom(&k), err)
		}
	}
	return nil
}

// SocketSlots counts the slots of kpr_sk_conn_v1 that a socket holds (a TCP or UDP socket
// connected to a VIP, until it is released), and all its slots. Sockets beyond them keep their
// reverse translation in the LRU map (TCP) or in socket storage (UDP).
func (m *LBMaps) SocketSlots() (taken, slots int, err error) {
	const chunk = 4096
	var (
		keys   = make([]uint32, chunk)
		vals   = make([]sockSkConn, chunk)
		cursor ebpf.MapBatchCursor
	)
	for {
		n, err := m.sockConn.BatchLookup(&cursor, keys, vals, nil)
		for _, v := range vals[:n] {
			if v.Cookie != 0 {
				taken++
			}
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return taken, int(m.sockConn.MaxEntries()), nil
		}
		if err != nil {
			return 0, 0, fmt.Errorf("read %s: %w", sockMapKprSkConnV1, err)
		}
	}
}

// ServiceCIDRs dumps the Service CIDRs, IPv4 first, each family in address order.
func (m *LBMaps) ServiceCIDRs() ([]netip.Prefix, error) {
	keys, err := m.serviceCIDRKeys()
	if err != nil {
		return nil, err
	}
	out := make([]netip.Prefix, 0, len(keys))
	for k := range keys {
		out = append(out, prefixFrom(&k))
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	return out, nil
}

func (m *LBMaps) serviceCIDRKeys() (map[sockSvcCidrKey]struct{}, error) {
	out := make(map[sockSvcCidrKey]struct{})
	var key sockSvcCidrKey
	var val uint8
	it := m.svcCIDRs.Iterate()
	for it.Next(&key, &val) {
		out[key] = struct{}{}
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("dump %s: %w", sockMapKprSvcCidrsV1, err)
	}
	return out, nil
}

// svcCIDRKey validates p and converts it to its trie key: IPv4 prefixes IPv4-mapped, with 96
// more bits.
func svcCIDRKey(p netip.Prefix) (sockSvcCidrKey, error) {
	switch {
	case !p.IsValid():
		return sockSvcCidrKey{}, fmt.Errorf("service CIDR %s: invalid prefix", p)
	case p != p.Masked():
		return sockSvcCidrKey{}, fmt.Errorf("service CIDR %s: host bits are set (the network is %s)", p, p.Masked())
	case p.Bits() == 0:
		// It would refuse every connection that is not to a Service, the API server's too.
		return sockSvcCidrKey{}, fmt.Errorf("service CIDR %s: a default route is no Service CIDR", p)
	case p.Addr().Is4In6():
		return sockSvcCidrKey{}, fmt.Errorf("service CIDR %s: IPv4-mapped; give it as an IPv4 CIDR", p)
	case p.Addr().Is6() && p.Overlaps(v4MappedSpace):
		return sockSvcCidrKey{}, fmt.Errorf("service CIDR %s: covers the IPv4-mapped range %s, that is all of IPv4", p, v4MappedSpace)
	}
	bits := p.Bits()
	if p.Addr().Is4() {
		bits += 96
	}
	return sockSvcCidrKey{Prefixlen: uint32(bits), Addr: p.Addr().As16()}, nil
}

func prefixFrom(k *sockSvcCidrKey) netip.Prefix {
	a := netip.AddrFrom16(k.Addr)
	if a.Is4In6() && k.Prefixlen >= 96 {
		return netip.PrefixFrom(a.Unmap(), int(k.Prefixlen)-96)
	}
	return netip.PrefixFrom(a, int(k.Prefixlen))
}

// MaxBindGuardAddrs is how many NodePort addresses the bind() guard checks a wildcard bind
// against (BIND_GUARD_ADDRS in sock.c).
const MaxBindGuardAddrs = 16

// SetBindGuard makes bind() in the network namespace with cookie netnsCookie fail with
// EADDRINUSE for a TCP or UDP port that an external frontend serves: on the bound address
// itself, or for a wildcard bind on any of addrs (the node's NodePort addresses). With no
// addrs the guard is off. Other namespaces (pods) are never checked.
func (m *LBMaps) SetBindGuard(netnsCookie uint64, addrs []netip.Addr) error {
	if len(addrs) > MaxBindGuardAddrs {
		return fmt.Errorf("bind guard: %d NodePort addresses, at most %d are checked", len(addrs), MaxBindGuardAddrs)
	}
	v := sockBindGuard{NetnsCookie: netnsCookie, Count: uint32(len(addrs))}
	for i, a := range addrs {
		if err := validAddr(a); err != nil {
			return fmt.Errorf("bind guard: %w", err)
		}
		v.Addrs[i].B = a.As16()
	}
	if err := m.bindGuard.Update(uint32(0), &v, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("update %s: %w", sockMapKprBindGuardV1, err)
	}
	return nil
}
