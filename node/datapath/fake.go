package datapath

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"

	"github.com/kpr-dev/kpr/bpf"
)

var (
	_ LBMap = (*bpf.LBMaps)(nil)
	_ LBMap = (*Fake)(nil)
	_ LBMap = (*Faulty)(nil)
)

type slotKey struct {
	svc  bpf.ServiceKey
	slot int
}

// Fake is an in-memory LBMap with the BPF maps' layout (slot 0 plus one entry per backend
// slot). After every write it checks what a datapath reader could see at that moment: every
// frontend's slots 1..count exist and name a backend that exists, and if the frontend has
// session affinity, an affinity match entry for that backend (else a client sent there
// would lose its affinity on the next connect). A violation is recorded, so tests can prove
// the update order is make-before-break.
type Fake struct {
	mu         sync.Mutex
	master     map[bpf.ServiceKey]bpf.Service // slot 0 (Backends unused)
	slots      map[slotKey]uint32
	backends   map[uint32]bpf.Backend
	revnat     map[uint32]bpf.RevNat
	matches    map[bpf.AffinityMatch]struct{}
	Violations []string
	Writes     int
}

// NewFake returns an empty Fake.
func NewFake() *Fake {
	return &Fake{
		master:   map[bpf.ServiceKey]bpf.Service{},
		slots:    map[slotKey]uint32{},
		backends: map[uint32]bpf.Backend{},
		revnat:   map[uint32]bpf.RevNat{},
		matches:  map[bpf.AffinityMatch]struct{}{},
	}
}

func (f *Fake) check(op string) {
	f.Writes++
	for k, m := range f.master {
		for i := 1; i <= len(m.Backends); i++ {
			id, ok := f.slots[slotKey{k, i}]
			if !ok {
				f.Violations = append(f.Violations, fmt.Sprintf("after %s: %s slot %d missing", op, keyString(k), i))
				continue
			}
			if _, ok := f.backends[id]; !ok {
				f.Violations = append(f.Violations, fmt.Sprintf("after %s: %s slot %d names missing backend %d", op, keyString(k), i, id))
			}
			if _, ok := f.matches[bpf.AffinityMatch{SvcID: m.ID, BackendID: id}]; m.AffinityTimeoutSec > 0 && !ok {
				f.Violations = append(f.Violations, fmt.Sprintf("after %s: %s (affinity, svc_id %d) slot %d names backend %d without an affinity match entry", op, keyString(k), m.ID, i, id))
			}
		}
	}
}

func (f *Fake) UpsertBackend(id uint32, b bpf.Backend) error {
	_, err := f.UpsertBackends([]uint32{id}, []bpf.Backend{b})
	return err
}

// UpsertBackends writes one backend at a time, checking the readers' view after each, as
// the kernel's batch update does.
func (f *Fake) UpsertBackends(ids []uint32, bs []bpf.Backend) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i, id := range ids {
		f.backends[id] = bs[i]
		f.check("UpsertBackend")
	}
	return len(ids), nil
}

func (f *Fake) DeleteBackend(id uint32) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.backends, id)
	f.check("DeleteBackend")
	return nil
}

func (f *Fake) UpsertService(k bpf.ServiceKey, s bpf.Service, prevCount int) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i, id := range s.Backends {
		f.slots[slotKey{k, i + 1}] = id
		f.check("UpsertService slot")
	}
	m := s
	m.Backends = make([]uint32, len(s.Backends)) // only the count lives in slot 0
	f.master[k] = m
	f.check("UpsertService master")
	for i := len(s.Backends) + 1; i <= prevCount; i++ {
		delete(f.slots, slotKey{k, i})
		f.check("UpsertService trim")
	}
	return nil
}

func (f *Fake) DeleteService(k bpf.ServiceKey, count int) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.master, k)
	f.check("DeleteService master")
	for i := 1; i <= count; i++ {
		delete(f.slots, slotKey{k, i})
	}
	f.check("DeleteService slots")
	return nil
}

func (f *Fake) UpsertRevNat(id uint32, r bpf.RevNat) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.revnat[id] = r
	return nil
}

func (f *Fake) DeleteRevNat(id uint32) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.revnat, id)
	return nil
}

// Services reassembles the frontends from the slots, as bpf.LBMaps does.
func (f *Fake) Services() (map[bpf.ServiceKey]bpf.Service, error) {
	return bpf.AssembleServices(f.WalkServiceSlots)
}

// WalkServiceSlots calls fn with every slot entry, as the BPF map would (slot 0 and the
// backend slots, those beyond the count included), until fn returns false.
func (f *Fake) WalkServiceSlots(fn func(bpf.ServiceSlot) bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for k, m := range f.master {
		if !fn(bpf.ServiceSlot{Key: k, ID: m.ID, Flags: m.Flags, AffinityTimeoutSec: m.AffinityTimeoutSec, Count: uint16(len(m.Backends))}) {
			return nil
		}
	}
	for sk, id := range f.slots {
		if !fn(bpf.ServiceSlot{Key: sk.svc, Slot: uint16(sk.slot), BackendID: id}) {
			return nil
		}
	}
	return nil
}

// WalkBackends calls fn with every backend until fn returns false.
func (f *Fake) WalkBackends(fn func(uint32, bpf.Backend) bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for id, b := range f.backends {
		if !fn(id, b) {
			return nil
		}
	}
	return nil
}

// WalkAffinityMatches calls fn with every pair until fn returns false.
func (f *Fake) WalkAffinityMatches(fn func(bpf.AffinityMatch) bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for am := range f.matches {
		if !fn(am) {
			return nil
		}
	}
	return nil
}

func (f *Fake) Backends() (map[uint32]bpf.Backend, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return maps.Clone(f.backends), nil
}

func (f *Fake) RevNats() (map[uint32]bpf.RevNat, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return maps.Clone(f.revnat), nil
}

func (f *Fake) UpsertAffinityMatch(svcID, backendID uint32) error {
	if svcID == 0 || backendID == 0 {
		return fmt.Errorf("affinity match %d/%d: service and backend ID 0 are reserved", svcID, backendID)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.matches[bpf.AffinityMatch{SvcID: svcID, BackendID: backendID}] = struct{}{}
	f.check("UpsertAffinityMatch")
	return nil
}

func (f *Fake) DeleteAffinityMatch(svcID, backendID uint32) error {
	if svcID == 0 || backendID == 0 {
		return fmt.Errorf("affinity match %d/%d: service and backend ID 0 are reserved", svcID, backendID)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.matches, bpf.AffinityMatch{SvcID: svcID, BackendID: backendID})
	f.check("DeleteAffinityMatch")
	return nil
}

func (f *Fake) AffinityMatches() (map[bpf.AffinityMatch]struct{}, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return maps.Clone(f.matches), nil
}

// Slots returns the number of slot entries (excluding slot 0), to check that trimming happens.
func (f *Fake) Slots() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.slots)
}

// Faulty wraps an LBMap and fails the writes Fail selects.
type Faulty struct {
	LBMap
	// Fail is called with the operation name ("UpsertBackend", "UpsertService", ...) and the
	// number of writes so far; a non-nil error is returned instead of writing.
	Fail   func(op string, n int) error
	writes int
}

func (f *Faulty) fail(op string) error {
	f.writes++
	if f.Fail == nil {
		return nil
	}
	return f.Fail(op, f.writes)
}

// UpsertBackends counts one write per backend, and fails at the first that Fail selects
// after writing the ones before it, as a batch update that stops part way does.
func (f *Faulty) UpsertBackends(ids []uint32, bs []bpf.Backend) (int, error) {
	for i := range ids {
		if err := f.fail("UpsertBackend"); err != nil {
			n, werr := f.LBMap.UpsertBackends(ids[:i], bs[:i])
			return n, errors.Join(err, werr)
		}
	}
	return f.LBMap.UpsertBackends(ids, bs)
}

func (f *Faulty) DeleteBackend(id uint32) error {
	if err := f.fail("DeleteBackend"); err != nil {
		return err
	}
	return f.LBMap.DeleteBackend(id)
}

func (f *Faulty) UpsertService(k bpf.ServiceKey, s bpf.Service, prev int) error {
	if err := f.fail("UpsertService"); err != nil {
		return err
	}
	return f.LBMap.UpsertService(k, s, prev)
}

func (f *Faulty) DeleteService(k bpf.ServiceKey, count int) error {
	if err := f.fail("DeleteService"); err != nil {
		return err
	}
	return f.LBMap.DeleteService(k, count)
}

func (f *Faulty) UpsertRevNat(id uint32, r bpf.RevNat) error {
	if err := f.fail("UpsertRevNat"); err != nil {
		return err
	}
	return f.LBMap.UpsertRevNat(id, r)
}

func (f *Faulty) DeleteRevNat(id uint32) error {
	if err := f.fail("DeleteRevNat"); err != nil {
		return err
	}
	return f.LBMap.DeleteRevNat(id)
}

func (f *Faulty) UpsertAffinityMatch(svcID, backendID uint32) error {
	if err := f.fail("UpsertAffinityMatch"); err != nil {
		return err
	}
	return f.LBMap.UpsertAffinityMatch(svcID, backendID)
}

func (f *Faulty) DeleteAffinityMatch(svcID, backendID uint32) error {
	if err := f.fail("DeleteAffinityMatch"); err != nil {
		return err
	}
	return f.LBMap.DeleteAffinityMatch(svcID, backendID)
}

// SortedKeys returns m's keys in a stable order, for tests and listings.
func SortedKeys[V any](m map[bpf.ServiceKey]V) []bpf.ServiceKey {
	keys := slices.Collect(maps.Keys(m))
	slices.SortFunc(keys, compareKeys)
	return keys
}
