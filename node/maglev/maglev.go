// Package maglev builds Maglev consistent-hashing lookup tables (Eisenbud et al., "Maglev: A
// Fast and Reliable Software Network Load Balancer", NSDI 2016, section 3.4) for north-south
// backend selection. The agent writes a frontend's table into a BPF array and the datapath
// picks table[flow hash % size]; the BPF side never recomputes the table, but every node's agent
// must produce the same one, so that a flow reaching any node is sent to the same backend and
// survives ECMP changes in front of the cluster.
//
// The table is a pure function of (the set of backends with weight > 0, their weights, the
// table size, the seed). Changing any step below changes the tables of nodes running different
// kpr versions during an upgrade, so it is pinned by a golden test:
//
//  1. Backends with weight 0 are dropped; the rest are sorted by Name, byte-wise.
//  2. Each backend's Name is hashed with SipHash-2-4, keyed by the seed (k0 = seed bytes 0-7
//     little-endian, k1 = seed bytes 8-11 little-endian, high 32 bits zero): h.
//     offset = (h & 0xffffffff) % size, skip = (h >> 32) % (size-1) + 1. Because size is prime,
//     offset, offset+skip, offset+2*skip, ... (mod size) visits every slot: the backend's
//     preference list.
//  3. Each backend's number of slots is apportioned by largest remainder: c = floor(size *
//     weight / sum of weights), and the slots this leaves over go one each to the backends
//     with the largest remainders (size * weight mod sum), ties to the earlier name. So a
//     backend gets its share of the table to within one slot, and one whose share is below a
//     slot may get none.
//  4. Backends take turns; in its turn a backend claims the next slot of its preference list
//     that is still free. The next turn goes to the backend with the largest c / (turns taken
//     + 1); on a tie to the one that has had fewer turns, then to the earlier name. This is
//     the sequence of the D'Hondt method over the counts c: it spreads a heavy backend's turns
//     over the whole population instead of giving it a run of them, and ends with every
//     backend at exactly c slots. With equal weights it is the paper's round robin in name
//     order.
//  5. Population stops when every slot is taken, after exactly size turns.
package maglev

import (
	"cmp"
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"slices"
	"strings"
)

// Table sizes. They must be prime (step 2 of the package documentation) and should be well
// above the number of backends: the paper picks size > 100 * backends, which keeps the
// backends' shares within 1% of each other, and a larger table also moves fewer flows
// between surviving backends when one is added or removed.
const (
	MinTableSize     = 251
	MaxTableSize     = 131071
	DefaultTableSize = 16381
)

// ValidTableSize reports whether m can be the maglevTableSize setting: a prime in
// [MinTableSize, MaxTableSize].
func ValidTableSize(m int) error {
	if m < MinTableSize || m > MaxTableSize || !isPrime(m) {
		return fmt.Errorf("maglevTableSize: %d is not a prime between %d and %d "+
			"(e.g. 251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071)", m, MinTableSize, MaxTableSize)
	}
	return nil
}

func isPrime(m int) bool {
	if m < 2 {
		return false
	}
	for d := 2; d*d <= m; d++ {
		if m%d == 0 {
			return false
		}
	}
	return true
}

// SeedLen is the length of a seed in bytes. Twelve bytes are 16 characters of base64 without
// padding, the format Cilium's maglev.hash-seed uses, so an operator's habit carries over.
const SeedLen = 12

// Seed keys the hash that orders each backend's preference list. It must be the same on every
// node (it is cluster configuration, maglevHashSeed), and should be random so that which flows
// share a backend cannot be predicted from backend addresses alone.
type Seed [SeedLen]byte

// ParseSeed decodes the maglevHashSeed setting: 12 bytes in standard base64 (16 characters),
// as NewSeed or `head -c 12 /dev/urandom | base64` produce. Surrounding white space, as a
// trailing newline from a file, is ignored.
func ParseSeed(b64 string) (Seed, error) {
	var s Seed
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(b64))
	if err != nil {
		return s, fmt.Errorf("maglevHashSeed: not standard base64: %w "+
			"(want %d random bytes as 16 characters, e.g. from `head -c %d /dev/urandom | base64`)", err, SeedLen, SeedLen)
	}
	if len(raw) != SeedLen {
		return s, fmt.Errorf("maglevHashSeed: decodes to %d bytes, want %d "+
			"(16 base64 characters, e.g. from `head -c %d /dev/urandom | base64`)", len(raw), SeedLen, SeedLen)
	}
	copy(s[:], raw)
	return s, nil
}

// String returns the seed in the encoding ParseSeed accepts.
func (s Seed) String() string { return base64.StdEncoding.EncodeToString(s[:]) }

// NewSeed returns a random seed in the encoding ParseSeed accepts, for an operator to put in
// every node's configuration.
func NewSeed() (string, error) {
	var s Seed
	if _, err := rand.Read(s[:]); err != nil {
		return "", fmt.Errorf("maglevHashSeed: %w", err)
	}
	return s.String(), nil
}

// key returns the SipHash key of the seed.
func (s Seed) key() (k0, k1 uint64) {
	return binary.LittleEndian.Uint64(s[0:8]), uint64(binary.LittleEndian.Uint32(s[8:12]))
}

// Backend is one candidate of a frontend's table.
type Backend struct {
	// Name identifies the backend identically on every node, e.g. "10.244.1.2:8080/tcp": it
	// places the backend in the table, so it must not contain node-local data such as a
	// backend ID.
	Name string
	// Weight is the backend's share relative to the others. 0 excludes the backend; the zero
	// value is therefore excluded, and callers give ordinary backends 1.
	Weight uint16
}

// candidate is a backend being placed: where it is in its preference list and how many turns
// it has had.
type candidate struct {
	index  int    // in the caller's slice
	weight uint64 // > 0
	quota  uint64 // slots it gets
	skip   uint32
	next   uint32 // next slot of the preference list to try
	turns  uint64
}

// Table returns the Maglev lookup table of size slots for backends: table[i] is an index into
// backends. Only backends with a Weight above 0 appear, each in Weight/sum(Weight) of the
// slots to within one slot. The input order does not matter (see the package documentation):
// a caller that maps the indices to names gets the same table on every node.
//
// A list with no backend of weight above 0 gives an empty table and no error: a Service without
// ready endpoints is an ordinary state, whose traffic the datapath refuses from the frontend's
// backend count of 0 (slot 0) without looking at a table. Lookup returns -1 on it.
//
// Errors: a size ValidTableSize rejects, an empty or duplicated Name (a duplicate would make the
// order, and so the table, depend on the input order), and more usable backends than slots
// (some could never be chosen).
func Table(backends []Backend, size int, seed Seed) ([]int, error) {
	if err := ValidTableSize(size); err != nil {
		return nil, err
	}
	byName := make([]int, len(backends))
	for i, b := range backends {
		if b.Name == "" {
			return nil, fmt.Errorf("maglev: backend %d has no name", i)
		}
		byName[i] = i
	}
	slices.SortFunc(byName, func(a, b int) int { return strings.Compare(backends[a].Name, backends[b].Name) })
	order := make([]int, 0, len(backends)) // usable backends, by name
	for i, idx := range byName {
		if i > 0 && backends[idx].Name == backends[byName[i-1]].Name {
			return nil, fmt.Errorf("maglev: backend name %q appears more than once", backends[idx].Name)
		}
		if backends[idx].Weight > 0 {
			order = append(order, idx)
		}
	}
	if len(order) == 0 {
		return []int{}, nil
	}
	if len(order) > size {
		return nil, fmt.Errorf("maglev: %d backends do not fit in a table of %d slots; raise maglevTableSize",
			len(order), size)
	}

	k0, k1 := seed.key()
	m := uint64(size)
	cands := make([]candidate, len(order))
	uniform := true
	var sum uint64
	for i, idx := range order {
		h := sipHash24(k0, k1, []byte(backends[idx].Name))
		cands[i] = candidate{
			index:  idx,
			weight: uint64(backends[idx].Weight),
			next:   uint32((h & 0xffffffff) % m),
			skip:   uint32((h>>32)%(m-1) + 1),
		}
		sum += cands[i].weight
		uniform = uniform && cands[i].weight == cands[0].weight
	}

	table := make([]int, size)
	for i := range table {
		table[i] = -1
	}
	claim := func(c *candidate) {
		s := c.next
		for table[s] >= 0 {
			if s += c.skip; s >= uint32(size) {
				s -= uint32(size)
			}
		}
		table[s] = c.index
		if s += c.skip; s >= uint32(size) {
			s -= uint32(size)
		}
		c.next = s
		c.turns++
	}

	if uniform {
		// Equal weights apportion floor or ceil(size/n) slots, the extra ones to the first
		// names, and the D'Hondt sequence over such counts is round robin in name order.
		for filled := 0; ; {
			for i := range cands {
				claim(&cands[i])
				if filled++; filled == size {
					return table, nil
				}
			}
		}
	}

	apportion(cands, m, sum)
	// h is a binary heap of the candidates that have slots to claim, the one whose turn is
	// next on top: largest quota/(turns+1), compared exactly by cross-multiplication (quota
	// and turns are at most size < 2^17), then fewer turns, then the earlier name.
	before := func(a, b int32) bool {
		ca, cb := &cands[a], &cands[b]
		if l, r := ca.quota*(cb.turns+1), cb.quota*(ca.turns+1); l != r {
			return l > r
		}
		if ca.turns != cb.turns {
			return ca.turns < cb.turns
		}
		return a < b
	}
	h := make([]int32, 0, len(cands))
	for i := range cands {
		if cands[i].quota > 0 {
			h = append(h, int32(i))
		}
	}
	for i := len(h)/2 - 1; i >= 0; i-- {
		siftDown(h, i, before)
	}
	for filled := 0; filled < size; filled++ {
		claim(&cands[h[0]])
		siftDown(h, 0, before)
	}
	return table, nil
}

// apportion sets each candidate's quota: its share of m slots by largest remainder (step 3 of
// the package documentation). The products stay below 2^17 * 2^16 * 2^17.
func apportion(cands []candidate, m, sum uint64) {
	left := m
	for i := range cands {
		cands[i].quota = m * cands[i].weight / sum
		left -= cands[i].quota
	}
	if left == 0 {
		return
	}
	byRemainder := make([]int, len(cands))
	for i := range byRemainder {
		byRemainder[i] = i
	}
	slices.SortStableFunc(byRemainder, func(a, b int) int {
		return cmp.Compare(m*cands[b].weight%sum, m*cands[a].weight%sum)
	})
	for _, i := range byRemainder[:left] {
		cands[i].quota++
	}
}

func siftDown(h []int32, i int, before func(a, b int32) bool) {
	for {
		l := 2*i + 1
		if l >= len(h) {
			return
		}
		c := l
		if r := l + 1; r < len(h) && before(h[r], h[l]) {
			c = r
		}
		if !before(h[c], h[i]) {
			return
		}
		h[i], h[c] = h[c], h[i]
		i = c
	}
}

// Lookup returns the backend index a flow with the given hash selects: table[hash % len(table)],
// the computation the datapath does. It returns -1 for an empty table.
func Lookup(table []int, hash uint32) int {
	if len(table) == 0 {
		return -1
	}
	return table[hash%uint32(len(table))]
}
