package bpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"golang.org/x/sys/unix"
)

// Defaults of the north-south datapath, used for the zero values of Config and NodePortConfig.
const (
	// DefaultConntrackMapSize is the number of flows (entries of kpr_lb_ct_v1, and as many of
	// kpr_lb_snat_v1).
	DefaultConntrackMapSize = 131072
	// DefaultMaglevMapSize is the number of frontends that can have a Maglev table.
	DefaultMaglevMapSize = 65536
	// DefaultMaglevTableSize is node/maglev.DefaultTableSize: entries of every table.
	DefaultMaglevTableSize = 16381

	DefaultTCPTimeout      = 6 * time.Hour
	DefaultTCPSynTimeout   = time.Minute
	DefaultTCPCloseTimeout = 10 * time.Second
	DefaultUDPTimeout      = time.Minute
)

// DefaultSNATPorts is the range kpr's SNAT takes source ports from: node/masq's
// SuggestedSNATPortRange, above the kernel's default ephemeral port range, which node sockets
// and the nftables masquerade use, so no two translations can produce the same tuple.
var DefaultSNATPorts = PortRange{61000, 65535}

// PortRange is an inclusive range of ports. The zero value means "not set".
type PortRange struct {
	First, Last uint16
}

func (r PortRange) String() string { return fmt.Sprintf("%d-%d", r.First, r.Last) }

// NodePortConfig is the north-south datapath's runtime configuration (kpr_lb_config_v1). It can
// be changed at any time with NodePortMaps.SetConfig; flows already translated keep their
// addresses and ports.
type NodePortConfig struct {
	// SNATAddr4 and SNATAddr6 are this node's addresses that translated flows come from, one
	// per family; backends must route them back to this node. A family without one (the zero
	// Addr) drops its packets to external frontends (Stats DropNoNodeAddr).
	SNATAddr4, SNATAddr6 netip.Addr
	// SNATPorts is the range of SNAT source ports; the zero value selects DefaultSNATPorts.
	// It must not overlap the node's ephemeral ports or the masquerade range.
	SNATPorts PortRange
	// HashSeed seeds the flow hash that indexes Maglev tables. It must be the same on every
	// node, so that a flow picks the same backend whichever node it reaches.
	HashSeed uint32
	// Idle timeouts of a flow, after which its SNAT port may be given to a new flow: TCP
	// after a reply, TCP before any reply, TCP after a RST or a FIN from both ends, UDP.
	// Zero selects the default; they are kept in whole seconds.
	TCPTimeout, TCPSynTimeout, TCPCloseTimeout, UDPTimeout time.Duration
}

// TCHook is where a tc program of the north-south datapath is attached.
type TCHook uint8

const (
	// TCNodePort is tc_nodeport at ingress: devices on which clients reach external frontends.
	TCNodePort TCHook = iota
	// TCReply is tc_nodeport_reply at ingress: the node's other devices, on which backends'
	// replies to translated flows arrive (pods' veths). tc_nodeport does the same for the
	// replies that come back through a configured device.
	TCReply
)

func (h TCHook) String() string {
	switch h {
	case TCNodePort:
		return "nodeport"
	case TCReply:
		return "reply"
	}
	return fmt.Sprintf("hook(%d)", uint8(h))
}

// tcPinPrefix starts the names of pinned tcx links in linksDir: tcx_<hook>_<ifindex>.
const tcPinPrefix = "tcx_"

func tcPinName(h TCHook, ifindex int) string {
	return fmt.Sprintf("%s%s_%d", tcPinPrefix, h, ifindex)
}

// lbMapNames are the pinned maps of the north-south object that the socket object does not
// share, in a stable order.
var lbMapNames = []string{
	lbMapKprLbConfigV1,
	lbMapKprLbCtV1,
	lbMapKprLbSnatV1,
	lbMapKprLbStatsV1,
	lbMapKprMaglevV1,
	lbMapKprLbSrcRangesV1,
	lbMapKprLbAffinityV1,
	lbMapKprLbReplyPortsV1,
}

func (c Config) lbMapSizes() ([]mapSize, int, error) {
	sizes := []mapSize{
		// Shared with the socket object: sized from the same fields.
		{lbMapKprSvcV1, "ServiceMapSize", c.ServiceMapSize},
		{lbMapKprBackendsV1, "BackendMapSize", c.BackendMapSize},
		{lbMapKprLbCtV1, "ConntrackMapSize", c.ConntrackMapSize},
		{lbMapKprLbSnatV1, "ConntrackMapSize", c.ConntrackMapSize},
		{lbMapKprMaglevV1, "MaglevMapSize", c.MaglevMapSize},
		{lbMapKprAffinityMatchV1, "AffinityMatchMapSize", c.AffinityMatchMapSize}, // shared
		{lbMapKprLbAffinityV1, "AffinityMapSize", c.AffinityMapSize},
	}
	defaults := []int{DefaultServiceMapSize, DefaultBackendMapSize, DefaultConntrackMapSize,
		DefaultConntrackMapSize, DefaultMaglevMapSize, DefaultAffinityMatchMapSize, DefaultAffinityMapSize}
	for i := range sizes {
		switch {
		case sizes[i].size < 0 || uint64(sizes[i].size) > math.MaxUint32:
			return nil, 0, fmt.Errorf("config %s: %d is out of range (0 selects the default %d)",
				sizes[i].field, sizes[i].size, defaults[i])
		case sizes[i].size == 0:
			sizes[i].size = defaults[i]
		}
	}
	table := c.MaglevTableSize
	switch {
	case table == 0:
		table = DefaultMaglevTableSize
	case table < 0 || table > maxMaglevTableSize:
		return nil, 0, fmt.Errorf("config MaglevTableSize: %d is out of range (0 selects the default %d)",
			table, DefaultMaglevTableSize)
	}
	// Not configurable: listed so that a pinned map of another layout is reported.
	sizes = append(sizes,
		mapSize{lbMapKprLbConfigV1, "", 1},
		mapSize{lbMapKprLbStatsV1, "", int(lbLbStatSTAT_MAX)},
		mapSize{lbMapKprLbSrcRangesV1, "", MaxSourceRanges})
	return sizes, table, nil
}

// maxMaglevTableSize is node/maglev.MaxTableSize.
const maxMaglevTableSize = 131071

// NodePortMaps gives typed access to the maps of the north-south datapath that the socket
// load balancer does not share. Frontends and backends (scope ScopeExternal) are written
// through LBMaps, as for the socket load balancer.
type NodePortMaps struct {
	config *ebpf.Map
	ct     *ebpf.Map
	snat   *ebpf.Map
	stats  *ebpf.Map
	maglev *ebpf.Map
	// srcRanges holds the loadBalancerSourceRanges of frontends with FlagSourceRanges.
	srcRanges *ebpf.Map
	// affinity remembers each external client's backend per frontend with session affinity.
	affinity *ebpf.Map
	// replyPorts marks the backend ports translated flows used (kpr_lb_reply_ports_v1).
	replyPorts *ebpf.Map
	// tableSize is the number of entries of every Maglev table.
	tableSize int
}

func (m *NodePortMaps) byName() map[string]**ebpf.Map {
	return map[string]**ebpf.Map{
		lbMapKprLbConfigV1:     &m.config,
		lbMapKprLbCtV1:         &m.ct,
		lbMapKprLbSnatV1:       &m.snat,
		lbMapKprLbStatsV1:      &m.stats,
		lbMapKprMaglevV1:       &m.maglev,
		lbMapKprLbSrcRangesV1:  &m.srcRanges,
		lbMapKprLbAffinityV1:   &m.affinity,
		lbMapKprLbReplyPortsV1: &m.replyPorts,
	}
}

// OpenNodePortMaps opens the north-south maps pinned in pinDir without loading any program,
// for `kpr` debugging commands.
func OpenNodePortMaps(pinDir string) (*NodePortMaps, error) {
	m := &NodePortMaps{}
	for _, name := range lbMapNames {
		mp, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, name), nil)
		if errors.Is(err, os.ErrNotExist) {
			m.Close()
			return nil, fmt.Errorf("pinned map %s is missing in %s: the north-south datapath is not loaded", name, pinDir)
		}
		if err != nil {
			m.Close()
			return nil, fmt.Errorf("open pinned map %s: %w", name, err)
		}
		*m.byName()[name] = mp
	}
	if err := checkNodePortLayouts(m); err != nil {
		m.Close()
		return nil, err
	}
	cfg, err := m.rawConfig()
	if err != nil {
		m.Close()
		return nil, err
	}
	m.tableSize = int(cfg.MaglevSize)
	return m, nil
}

func checkNodePortLayouts(m *NodePortMaps) error {
	layouts := map[string][2]int{
		lbMapKprLbConfigV1:     {4, binary.Size(lbLbConfig{})},
		lbMapKprLbCtV1:         {binary.Size(lbFlowKey{}), binary.Size(lbCtValue{})},
		lbMapKprLbSnatV1:       {binary.Size(lbFlowKey{}), binary.Size(lbSnatValue{})},
		lbMapKprLbStatsV1:      {4, 8},
		lbMapKprMaglevV1:       {4, 4},
		lbMapKprLbReplyPortsV1: {4, 1},
		lbMapKprLbSrcRangesV1:  {binary.Size(lbSrcRangeKey{}), 1},
		lbMapKprLbAffinityV1:   {binary.Size(lbLbAffinityKey{}), binary.Size(lbAffinityValue{})},
	}
	for name, p := range m.byName() {
		want := layouts[name]
		if int((*p).KeySize()) != want[0] || int((*p).ValueSize()) != want[1] {
			return fmt.Errorf("pinned map %s has key/value size %d/%d, this kpr uses %d/%d: it was created by an incompatible kpr version, remove it with `kpr cleanup`",
				name, (*p).KeySize(), (*p).ValueSize(), want[0], want[1])
		}
	}
	return nil
}

// Close closes the map file descriptors; pins stay.
func (m *NodePortMaps) Close() error {
	var errs []error
	for _, name := range lbMapNames {
		p := m.byName()[name]
		if *p != nil {
			errs = append(errs, (*p).Close())
			*p = nil
		}
	}
	return errors.Join(errs...)
}

func (m *NodePortMaps) rawConfig() (lbLbConfig, error) {
	var c lbLbConfig
	if err := m.config.Lookup(uint32(0), &c); err != nil {
		return c, fmt.Errorf("read %s: %w", lbMapKprLbConfigV1, err)
	}
	return c, nil
}

// SetConfig writes the runtime configuration. Zero fields select their defaults.
func (m *NodePortMaps) SetConfig(c NodePortConfig) error {
	raw, err := c.raw(m.tableSize)
	if err != nil {
		return err
	}
	if err := m.config.Update(uint32(0), &raw, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("update %s: %w", lbMapKprLbConfigV1, err)
	}
	return nil
}

// Config reads the runtime configuration back, with the defaults filled in.
func (m *NodePortMaps) Config() (NodePortConfig, error) {
	raw, err := m.rawConfig()
	if err != nil {
		return NodePortConfig{}, err
	}
	c := NodePortConfig{
		SNATPorts:       PortRange{raw.SnatPortMin, raw.SnatPortMax},
		HashSeed:        raw.HashSeed,
		TCPTimeout:      time.Duration(raw.TcpTimeoutSec) * time.Second,
		TCPSynTimeout:   time.Duration(raw.TcpSynTimeoutSec) * time.Second,
		TCPCloseTimeout: time.Duration(raw.TcpCloseTimeoutSec) * time.Second,
		UDPTimeout:      time.Duration(raw.UdpTimeoutSec) * time.Second,
	}
	if raw.Addr4 != [16]byte{} {
		c.SNATAddr4 = netip.AddrFrom16(raw.Addr4).Unmap()
	}
	if raw.Addr6 != [16]byte{} {
		c.SNATAddr6 = netip.AddrFrom16(raw.Addr6)
	}
	return c, nil
}

func (c NodePortConfig) raw(tableSize int) (lbLbConfig, error) {
	raw := lbLbConfig{MaglevSize: uint32(tableSize), HashSeed: c.HashSeed}
	if c.SNATAddr4.IsValid() {
		if !c.SNATAddr4.Is4() {
			return raw, fmt.Errorf("nodeport SNATAddr4 %s: not an IPv4 address", c.SNATAddr4)
		}
		raw.Addr4 = c.SNATAddr4.As16()
	}
	if c.SNATAddr6.IsValid() {
		if !c.SNATAddr6.Is6() || c.SNATAddr6.Is4In6() || c.SNATAddr6.Zone() != "" {
			return raw, fmt.Errorf("nodeport SNATAddr6 %s: not an IPv6 address without zone", c.SNATAddr6)
		}
		raw.Addr6 = c.SNATAddr6.As16()
	}
	ports := c.SNATPorts
	if ports == (PortRange{}) {
		ports = DefaultSNATPorts
	}
	if ports.First == 0 || ports.Last < ports.First {
		return raw, fmt.Errorf("nodeport SNATPorts %s: not a range of ports from 1 to 65535", ports)
	}
	raw.SnatPortMin, raw.SnatPortMax = ports.First, ports.Last
	timeouts := []struct {
		name string
		d    time.Duration
		def  time.Duration
		out  *uint32
	}{
		{"TCPTimeout", c.TCPTimeout, DefaultTCPTimeout, &raw.TcpTimeoutSec},
		{"TCPSynTimeout", c.TCPSynTimeout, DefaultTCPSynTimeout, &raw.TcpSynTimeoutSec},
		{"TCPCloseTimeout", c.TCPCloseTimeout, DefaultTCPCloseTimeout, &raw.TcpCloseTimeoutSec},
		{"UDPTimeout", c.UDPTimeout, DefaultUDPTimeout, &raw.UdpTimeoutSec},
	}
	for _, t := range timeouts {
		d := t.d
		if d == 0 {
			d = t.def
		}
		// The datapath compares signed 32-bit second counts.
		if d < time.Second || d > math.MaxInt32*time.Second {
			return raw, fmt.Errorf("nodeport %s %s: must be between 1s and %v", t.name, d, math.MaxInt32*time.Second)
		}
		*t.out = uint32(d / time.Second)
	}
	return raw, nil
}

// MaglevTableSize is the number of entries every Maglev table has.
func (m *NodePortMaps) MaglevTableSize() int { return m.tableSize }

// SetMaglevTable makes table the Maglev lookup table of svc_id svcID: a new flow to one of the
// frontend's addresses goes to backend table[flow hash % len(table)] instead of a random slot.
// table holds backend IDs (none 0) and has exactly MaglevTableSize entries; node/maglev.Table
// builds it (its indices mapped to backend IDs). The table replaces the previous one at once:
// it is written to a new inner map, which then takes the old one's place in kpr_maglev_v1.
func (m *NodePortMaps) SetMaglevTable(svcID uint32, table []uint32) error {
	if svcID == 0 {
		return fmt.Errorf("maglev table: service ID 0 is reserved")
	}
	if len(table) != m.tableSize {
		return fmt.Errorf("maglev table of service %d: %d entries, the datapath's tables have %d (config MaglevTableSize)",
			svcID, len(table), m.tableSize)
	}
	if i := slices.Index(table, 0); i >= 0 {
		return fmt.Errorf("maglev table of service %d: entry %d is backend ID 0, which is reserved", svcID, i)
	}
	inner, err := ebpf.NewMap(maglevInnerSpec(m.tableSize))
	if err != nil {
		return fmt.Errorf("maglev table of service %d: create inner map: %w", svcID, err)
	}
	defer inner.Close()
	keys := make([]uint32, len(table))
	for i := range keys {
		keys[i] = uint32(i)
	}
	if _, err := inner.BatchUpdate(keys, table, nil); err != nil {
		return fmt.Errorf("maglev table of service %d: fill inner map: %w", svcID, err)
	}
	if err := m.maglev.Update(svcID, inner, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("update %s[%d]: %w", lbMapKprMaglevV1, svcID, err)
	}
	return nil
}

func maglevInnerSpec(size int) *ebpf.MapSpec {
	return &ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: uint32(size)}
}

// DeleteMaglevTable removes the table of svcID; its new flows go to random slots again.
// Deleting a missing table is no error.
func (m *NodePortMaps) DeleteMaglevTable(svcID uint32) error {
	if err := deleteIgnoreMissing(m.maglev, svcID); err != nil {
		return fmt.Errorf("delete %s[%d]: %w", lbMapKprMaglevV1, svcID, err)
	}
	return nil
}

// MaglevTable reads the table of svcID back; nil if it has none.
func (m *NodePortMaps) MaglevTable(svcID uint32) ([]uint32, error) {
	var id ebpf.MapID
	err := m.maglev.Lookup(svcID, &id)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("lookup %s[%d]: %w", lbMapKprMaglevV1, svcID, err)
	}
	inner, err := ebpf.NewMapFromID(id)
	if err != nil {
		return nil, fmt.Errorf("open maglev table of service %d: %w", svcID, err)
	}
	defer inner.Close()
	out := make([]uint32, inner.MaxEntries())
	var k, v uint32
	it := inner.Iterate()
	for it.Next(&k, &v) {
		out[k] = v
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read maglev table of service %d: %w", svcID, err)
	}
	return out, nil
}

// MaxSourceRanges is how many loadBalancerSourceRanges prefixes, over all frontends, the
// datapath holds (SRC_RANGE_MAP_SIZE in lb.c).
const MaxSourceRanges = 16384

// SourceRange is one prefix of a frontend's loadBalancerSourceRanges.
type SourceRange struct {
	SvcID  uint32
	Prefix netip.Prefix
}

func srcRangeKey(r SourceRange) (lbSrcRangeKey, error) {
	if r.SvcID == 0 {
		return lbSrcRangeKey{}, fmt.Errorf("source range %s: service ID 0 is reserved", r.Prefix)
	}
	p := r.Prefix
	if !p.IsValid() || p.Addr().Zone() != "" || p.Addr().Is4In6() || p != p.Masked() {
		return lbSrcRangeKey{}, fmt.Errorf("source range %s of service %d: want a masked IPv4 or IPv6 prefix", p, r.SvcID)
	}
	bits := p.Bits()
	if p.Addr().Is4() {
		bits += 96
	}
	return lbSrcRangeKey{Prefixlen: uint32(32 + bits), SvcId: r.SvcID, Addr: p.Addr().As16()}, nil
}

// AddSourceRange lets the clients in r.Prefix reach the frontend r.SvcID (when its slot 0
// has FlagSourceRanges).
func (m *NodePortMaps) AddSourceRange(r SourceRange) error {
	k, err := srcRangeKey(r)
	if err != nil {
		return err
	}
	if err := m.srcRanges.Update(&k, uint8(1), ebpf.UpdateAny); err != nil {
		return fmt.Errorf("update %s[%d %s]: %w", lbMapKprLbSrcRangesV1, r.SvcID, r.Prefix, err)
	}
	return nil
}

// DeleteSourceRange removes r; removing a missing one is no error.
func (m *NodePortMaps) DeleteSourceRange(r SourceRange) error {
	k, err := srcRangeKey(r)
	if err != nil {
		return err
	}
	if err := deleteIgnoreMissing(m.srcRanges, &k); err != nil {
		return fmt.Errorf("delete %s[%d %s]: %w", lbMapKprLbSrcRangesV1, r.SvcID, r.Prefix, err)
	}
	return nil
}

// WalkSourceRanges calls fn with each entry until it returns false.
func (m *NodePortMaps) WalkSourceRanges(fn func(SourceRange) bool) error {
	var k lbSrcRangeKey
	var v uint8
	it := m.srcRanges.Iterate()
	for it.Next(&k, &v) {
		bits := int(k.Prefixlen) - 32
		addr := netip.AddrFrom16(k.Addr)
		if addr.Is4In6() && bits >= 96 {
			addr, bits = addr.Unmap(), bits-96
		}
		if !fn(SourceRange{SvcID: k.SvcId, Prefix: netip.PrefixFrom(addr, bits)}) {
			return nil
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("dump %s: %w", lbMapKprLbSrcRangesV1, err)
	}
	return nil
}

// MaglevServices lists the svc_ids that have a Maglev table, sorted.
func (m *NodePortMaps) MaglevServices() ([]uint32, error) {
	var ids []uint32
	var k uint32
	var v ebpf.MapID
	it := m.maglev.Iterate()
	for it.Next(&k, &v) {
		ids = append(ids, k)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("dump %s: %w", lbMapKprMaglevV1, err)
	}
	slices.Sort(ids)
	return ids, nil
}

// Flow is one translated connection, as its conntrack and reverse NAT entries describe it.
type Flow struct {
	Proto Proto
	// Client is the source of the packets the node received, Frontend their destination.
	Client, Frontend netip.AddrPort
	// Backend is where the flow goes; SNAT is the node address and port the backend sees.
	Backend, SNAT    netip.AddrPort
	BackendID, SvcID uint32
	// Idle is the time since the last packet of either direction.
	Idle time.Duration
	// Replied: the backend answered. Closing: RST, or FIN from both ends.
	Replied, Closing bool
	// NoReverse: the reverse entry is gone (evicted) or another flow's; replies of this
	// flow are not translated back.
	NoReverse bool
}

// Flows dumps the conntrack table. Entries that change during the dump may be missed or
// reported twice.
func (m *NodePortMaps) Flows() ([]Flow, error) {
	now, err := monotonicSec()
	if err != nil {
		return nil, err
	}
	var out []Flow
	var k lbFlowKey
	var v lbCtValue
	it := m.ct.Iterate()
	for it.Next(&k, &v) {
		f := Flow{
			Proto:     Proto(k.Proto),
			Client:    addrPort(k.Saddr, k.Sport),
			Frontend:  addrPort(k.Daddr, k.Dport),
			Backend:   addrPort(v.BackendAddr, v.BackendPort),
			SNAT:      addrPort(v.SnatAddr, v.SnatPort),
			BackendID: v.BackendId,
			SvcID:     v.SvcId,
		}
		last, flags := v.LastSeen, v.Flags
		rk := lbFlowKey{Saddr: v.BackendAddr, Daddr: v.SnatAddr, Sport: v.BackendPort, Dport: v.SnatPort, Proto: k.Proto}
		var rv lbSnatValue
		switch err := m.snat.Lookup(&rk, &rv); {
		case errors.Is(err, ebpf.ErrKeyNotExist):
			f.NoReverse = true
		case err != nil:
			return nil, fmt.Errorf("lookup %s: %w", lbMapKprLbSnatV1, err)
		case rv.ClientAddr != k.Saddr || rv.ClientPort != k.Sport || rv.VipAddr != k.Daddr || rv.VipPort != k.Dport:
			f.NoReverse = true // the port went to another flow
		default:
			if int32(rv.LastSeen-last) > 0 {
				last = rv.LastSeen
			}
			flags |= rv.Flags
		}
		f.Idle = time.Duration(int32(now-last)) * time.Second
		f.Replied = flags&ctReplied != 0
		f.Closing = flags&ctRST != 0 || flags&(ctFinClient|ctFinBackend) == ctFinClient|ctFinBackend
		out = append(out, f)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("dump %s: %w", lbMapKprLbCtV1, err)
	}
	return out, nil
}

// Flow state flags, CT_F_* in lb.c.
const (
	ctRST        = 1
	ctFinClient  = 2
	ctFinBackend = 4
	ctReplied    = 8
)

func addrPort(a [16]byte, port uint16) netip.AddrPort {
	return netip.AddrPortFrom(netip.AddrFrom16(a).Unmap(), hostPort(port))
}

// monotonicSec is the clock of the datapath's last_seen fields (bpf_ktime_get_ns).
func monotonicSec() (uint32, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0, fmt.Errorf("read CLOCK_MONOTONIC: %w", err)
	}
	return uint32(ts.Sec), nil
}

// NodePortStats are the north-south datapath's counters, summed over CPUs.
type NodePortStats struct {
	NewFlows  uint64 // flows created
	Forwarded uint64 // client packets translated to a backend
	Replies   uint64 // backend packets translated back
	// Rejected: packets to a frontend without endpoints answered with a TCP RST or an ICMP
	// port unreachable (no FlagUnreachable: kube-proxy's REJECT).
	Rejected uint64
	// Dropped packets: frontend without backends (or one whose refusal could not be built), VIP port not served (wildcard entry),
	// no free SNAT port, no SNAT address for the family, TTL exhausted, helper failure.
	DropNoBackend, DropNotServed, DropNoSNATPort, DropNoNodeAddr, DropTTL, DropError uint64
	// DropSourceRange: a client outside a frontend's loadBalancerSourceRanges.
	DropSourceRange uint64
	// EchoReplies: pings to an address with an echo marker answered.
	EchoReplies uint64
	// ICMPErrors: ICMP errors about translated flows passed on, translated, to the other end.
	ICMPErrors uint64
	// RateLimited: refusals and echo replies not made (and their packets dropped) over the
	// node's limit of 1,000 a second with bursts of 50.
	RateLimited uint64
	// TooBig: packets too big for the route to their backend, answered with fragmentation
	// needed (packet too big) from the frontend.
	TooBig uint64
	// TTLExceeded: packets whose TTL would have run out here, answered with time exceeded.
	TTLExceeded uint64
	// DSRLearned: packets of another node's DSR flow whose option told this node where the
	// backend's replies go (a flow counts once per SYN, or per datagram).
	DSRLearned uint64
	// DropDSRNoRoom: DSR packets whose IPv4 header had no room left for the option.
	DropDSRNoRoom uint64
	// XDPTx: packets the XDP program translated and sent back out of their device (they are
	// also counted as Forwarded or Replies).
	XDPTx uint64
	// Packets left to the stack: IPv4 fragments, malformed packets, translated packets the
	// FIB did not let kpr forward (local, unreachable, forwarding disabled).
	PassFragment, PassMalformed, PassFIB uint64
}

// Stats reads the counters.
func (m *NodePortMaps) Stats() (NodePortStats, error) {
	var s NodePortStats
	fields := map[lbLbStat]*uint64{
		lbLbStatSTAT_NEW_FLOW:          &s.NewFlows,
		lbLbStatSTAT_FWD:               &s.Forwarded,
		lbLbStatSTAT_REPLY:             &s.Replies,
		lbLbStatSTAT_DROP_NO_BACKEND:   &s.DropNoBackend,
		lbLbStatSTAT_DROP_NOT_SERVED:   &s.DropNotServed,
		lbLbStatSTAT_DROP_NO_SNAT_PORT: &s.DropNoSNATPort,
		lbLbStatSTAT_DROP_NO_NODE_ADDR: &s.DropNoNodeAddr,
		lbLbStatSTAT_DROP_TTL:          &s.DropTTL,
		lbLbStatSTAT_DROP_ERROR:        &s.DropError,
		lbLbStatSTAT_PASS_FRAGMENT:     &s.PassFragment,
		lbLbStatSTAT_PASS_MALFORMED:    &s.PassMalformed,
		lbLbStatSTAT_PASS_FIB:          &s.PassFIB,
		lbLbStatSTAT_REJECT:            &s.Rejected,
		lbLbStatSTAT_DROP_SOURCE_RANGE: &s.DropSourceRange,
		lbLbStatSTAT_ECHO_REPLY:        &s.EchoReplies,
		lbLbStatSTAT_ICMP_ERROR:        &s.ICMPErrors,
		lbLbStatSTAT_RATE_LIMITED:      &s.RateLimited,
		lbLbStatSTAT_TOO_BIG:           &s.TooBig,
		lbLbStatSTAT_TTL_EXCEEDED:      &s.TTLExceeded,
		lbLbStatSTAT_DSR_LEARNED:       &s.DSRLearned,
		lbLbStatSTAT_DROP_DSR_NO_ROOM:  &s.DropDSRNoRoom,
		lbLbStatSTAT_XDP_TX:            &s.XDPTx,
	}
	for stat, field := range fields {
		var perCPU []uint64
		if err := m.stats.Lookup(stat, &perCPU); err != nil {
			return s, fmt.Errorf("read %s[%d]: %w", lbMapKprLbStatsV1, stat, err)
		}
		for _, v := range perCPU {
			*field += v
		}
	}
	return s, nil
}

// ProbeNodePort checks that the kernel has what the north-south datapath needs and names the
// first missing feature. tcx (Linux 6.6) is checked when a program is attached.
func ProbeNodePort() error {
	if err := features.HaveProgramType(ebpf.SchedCLS); err != nil {
		return fmt.Errorf("kernel feature missing: BPF program type sched_cls (tc): %w", err)
	}
	for _, mt := range []struct {
		t    ebpf.MapType
		desc string
	}{
		{ebpf.LRUHash, "BPF map type lru_hash (Linux 4.10)"},
		{ebpf.HashOfMaps, "BPF map type hash_of_maps (Linux 4.12)"},
	} {
		if err := features.HaveMapType(mt.t); err != nil {
			return fmt.Errorf("kernel feature missing: %s: %w", mt.desc, err)
		}
	}
	helpers := []struct {
		fn   asm.BuiltinFunc
		desc string
	}{
		{asm.FnFibLookup, "helper bpf_fib_lookup for sched_cls (Linux 4.18)"},
		{asm.FnRedirectNeigh, "helper bpf_redirect_neigh for sched_cls (Linux 5.10)"},
		{asm.FnCsumDiff, "helper bpf_csum_diff for sched_cls (Linux 4.6)"},
	}
	for _, h := range helpers {
		if err := features.HaveProgramHelper(ebpf.SchedCLS, h.fn); err != nil {
			return fmt.Errorf("kernel feature missing: %s: %w", h.desc, err)
		}
	}
	return nil
}
