package masq

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// batchTimeout bounds one transaction (send and acknowledgements).
const batchTimeout = 10 * time.Second

// maxCommentLength is nft's limit for a rule comment (NFT_USERDATA_MAXLEN
// leaves room for more, but nft refuses to list longer ones).
const maxCommentLength = 128

var families = []Family{IPv4, IPv6}

// Manager writes, reads and deletes kpr's tables (one name, families ip and
// ip6) in the network namespace of an nftables connection. Its methods may be
// called from several goroutines.
type Manager struct {
	mu    sync.Mutex
	conn  *nftables.Conn
	table string
}

// NewManager returns a Manager for the tables named tableName (""
// means DefaultTableName). Reads go through conn; writes use a netlink socket
// of their own in the same namespace (conn.NetNS), so nothing is ever queued
// on conn. conn must be a real connection (not WithTestDial).
func NewManager(conn *nftables.Conn, tableName string) *Manager {
	if tableName == "" {
		tableName = DefaultTableName
	}
	return &Manager{conn: conn, table: tableName}
}

// Apply makes kpr's tables exactly rs in one transaction: the tables of both
// families are deleted and those in rs recreated, in a single batch the kernel
// commits atomically. It sends nothing when the installed tables already equal
// rs. Tables of other names are never touched.
func (m *Manager) Apply(rs Ruleset) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check(rs); err != nil {
		return err
	}
	// A read error just means we cannot skip the write.
	if cur, err := m.current(); err == nil && cur.Equal(rs) {
		return nil
	}
	var b batch
	for _, f := range families {
		b.deleteTable(f, m.table)
	}
	for _, t := range rs.Tables {
		if err := b.addTable(t); err != nil {
			return fmt.Errorf("masq: table %s %s: %w", t.Family, t.Name, err)
		}
	}
	return m.send(b.msgs)
}

// Delete removes kpr's tables of both families in one transaction (kpr
// cleanup). It is not an error if they do not exist.
func (m *Manager) Delete() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if cur, err := m.current(); err == nil && len(cur.Tables) == 0 {
		return nil
	}
	var b batch
	for _, f := range families {
		b.deleteTable(f, m.table)
	}
	return m.send(b.msgs)
}

// Current reads kpr's tables back: every set, chain and rule in them, with
// anything this package would not have written marked Unrecognized. The tables
// are read with several requests, not as one snapshot.
func (m *Manager) Current() (Ruleset, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.current()
}

func (m *Manager) check(rs Ruleset) error {
	seen := map[Family]bool{}
	for _, t := range rs.Tables {
		switch {
		case !t.Family.valid():
			return fmt.Errorf("masq: table family %q: kpr writes only %s and %s tables", t.Family, IPv4, IPv6)
		case t.Name != m.table:
			return fmt.Errorf("masq: table %s %s: this manager owns only tables named %q", t.Family, t.Name, m.table)
		case seen[t.Family]:
			return fmt.Errorf("masq: two %s tables", t.Family)
		}
		seen[t.Family] = true
	}
	return nil
}

func (m *Manager) current() (Ruleset, error) {
	var rs Ruleset
	for _, f := range families {
		tables, err := m.conn.ListTablesOfFamily(nftFamily(f))
		if err != nil {
			return Ruleset{}, fmt.Errorf("masq: list %s tables: %w", f, err)
		}
		i := slices.IndexFunc(tables, func(t *nftables.Table) bool { return t.Name == m.table })
		if i < 0 {
			continue
		}
		nt := tables[i]
		t := Table{Family: f, Name: m.table}

		sets, err := m.conn.GetSets(nt)
		if err != nil {
			return Ruleset{}, fmt.Errorf("masq: sets of table %s %s: %w", f, m.table, err)
		}
		for _, s := range sets {
			elems, err := m.conn.GetSetElements(s)
			if err != nil {
				return Ruleset{}, fmt.Errorf("masq: elements of set %s in table %s %s: %w", s.Name, f, m.table, err)
			}
			t.Sets = append(t.Sets, decodeSet(f, s, elems))
		}

		chains, err := m.conn.ListChainsOfTableFamily(nftFamily(f))
		if err != nil {
			return Ruleset{}, fmt.Errorf("masq: list %s chains: %w", f, err)
		}
		for _, c := range chains {
			if c.Table == nil || c.Table.Name != m.table {
				continue
			}
			rules, err := m.conn.GetRules(nt, c)
			if err != nil {
				return Ruleset{}, fmt.Errorf("masq: rules of chain %s in table %s %s: %w", c.Name, f, m.table, err)
			}
			ch := decodeChain(c)
			for _, r := range rules {
				ch.Rules = append(ch.Rules, decodeRule(f, r))
			}
			t.Chains = append(t.Chains, ch)
		}
		rs.Tables = append(rs.Tables, t)
	}
	return rs, nil
}

// send commits msgs as one nftables transaction and waits for the kernel's
// verdict on each message. If any is rejected the kernel aborts the whole
// transaction, so nothing changed.
func (m *Manager) send(msgs []netlink.Message) error {
	c, err := netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{NetNS: m.conn.NetNS})
	if err != nil {
		return fmt.Errorf("masq: open netlink: %w", err)
	}
	defer c.Close()
	// Best effort: with extended acks, errors carry the kernel's reason.
	_ = c.SetOption(netlink.ExtendedAcknowledge, true)
	if err := c.SetDeadline(time.Now().Add(batchTimeout)); err != nil {
		return fmt.Errorf("masq: netlink deadline: %w", err)
	}
	all := make([]netlink.Message, 0, len(msgs)+2)
	all = append(all, batchMessage(unix.NFNL_MSG_BATCH_BEGIN))
	all = append(all, msgs...)
	all = append(all, batchMessage(unix.NFNL_MSG_BATCH_END))
	if _, err := c.SendMessages(all); err != nil {
		return fmt.Errorf("masq: send nftables batch: %w", err)
	}
	// Every message asked for an acknowledgement; an error reply is
	// returned by Receive as an error.
	for acked := 0; acked < len(msgs); {
		replies, err := c.Receive()
		if err != nil {
			return fmt.Errorf("masq: nftables transaction rejected (nothing changed): %w", err)
		}
		for _, r := range replies {
			if r.Header.Type == netlink.Error {
				acked++
			}
		}
	}
	return nil
}

func batchMessage(typ uint16) netlink.Message {
	return netlink.Message{
		Header: netlink.Header{Type: netlink.HeaderType(typ), Flags: netlink.Request},
		Data:   nfgenmsg(unix.AF_UNSPEC, unix.NFNL_SUBSYS_NFTABLES),
	}
}

// nfgenmsg is struct nfgenmsg: family, version, big-endian resource ID.
func nfgenmsg(family uint8, resID uint16) []byte {
	return binary.BigEndian.AppendUint16([]byte{family, unix.NFNETLINK_V0}, resID)
}

func nftFamily(f Family) nftables.TableFamily {
	if f == IPv4 {
		return nftables.TableFamilyIPv4
	}
	return nftables.TableFamilyIPv6
}

// batch collects the messages of one transaction.
type batch struct {
	msgs   []netlink.Message
	lastID uint32
}

func (b *batch) add(f Family, typ uint16, flags netlink.HeaderFlags, attrs func(ae *netlink.AttributeEncoder) error) error {
	ae := netlink.NewAttributeEncoder()
	ae.ByteOrder = binary.BigEndian
	if err := attrs(ae); err != nil {
		return err
	}
	data, err := ae.Encode()
	if err != nil {
		return err
	}
	b.msgs = append(b.msgs, netlink.Message{
		Header: netlink.Header{
			Type:  netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | typ),
			Flags: netlink.Request | netlink.Acknowledge | flags,
		},
		Data: append(nfgenmsg(uint8(nftFamily(f)), 0), data...),
	})
	return nil
}

// deleteTable deletes table name of family f if it exists: adding it first
// makes the delete valid either way.
func (b *batch) deleteTable(f Family, name string) {
	// Neither can fail: the attributes are fixed.
	_ = b.add(f, unix.NFT_MSG_NEWTABLE, netlink.Create, func(ae *netlink.AttributeEncoder) error {
		ae.String(unix.NFTA_TABLE_NAME, name)
		ae.Uint32(unix.NFTA_TABLE_FLAGS, 0)
		return nil
	})
	_ = b.add(f, unix.NFT_MSG_DELTABLE, 0, func(ae *netlink.AttributeEncoder) error {
		ae.String(unix.NFTA_TABLE_NAME, name)
		return nil
	})
}

// addTable creates t with its sets, chains and rules, in that order (rules
// refer to sets and chains).
func (b *batch) addTable(t Table) error {
	f := t.Family
	if err := b.add(f, unix.NFT_MSG_NEWTABLE, netlink.Create|netlink.Excl, func(ae *netlink.AttributeEncoder) error {
		ae.String(unix.NFTA_TABLE_NAME, t.Name)
		ae.Uint32(unix.NFTA_TABLE_FLAGS, 0)
		return nil
	}); err != nil {
		return err
	}
	setIDs := map[string]uint32{}
	for _, s := range t.Sets {
		if err := b.addSet(t, s, setIDs); err != nil {
			return fmt.Errorf("set %s: %w", s.Name, err)
		}
	}
	for _, c := range t.Chains {
		if err := b.addChain(t, c); err != nil {
			return fmt.Errorf("chain %s: %w", c.Name, err)
		}
	}
	for _, c := range t.Chains {
		for i, r := range c.Rules {
			if err := b.addRule(t, c, r, setIDs); err != nil {
				return fmt.Errorf("chain %s rule %d: %w", c.Name, i, err)
			}
		}
	}
	return nil
}

func (b *batch) addSet(t Table, s Set, setIDs map[string]uint32) error {
	if s.Unrecognized != "" {
		return fmt.Errorf("not an address interval set: %s", s.Unrecognized)
	}
	if _, dup := setIDs[s.Name]; dup {
		return fmt.Errorf("defined twice")
	}
	keyType := nftables.TypeIPAddr
	if t.Family == IPv6 {
		keyType = nftables.TypeIP6Addr
	}
	elems, err := setElements(t.Family, s.Elements)
	if err != nil {
		return err
	}
	b.lastID++
	id := b.lastID
	setIDs[s.Name] = id
	if err := b.add(t.Family, unix.NFT_MSG_NEWSET, netlink.Create|netlink.Excl, func(ae *netlink.AttributeEncoder) error {
		ae.String(unix.NFTA_SET_TABLE, t.Name)
		ae.String(unix.NFTA_SET_NAME, s.Name)
		ae.Uint32(unix.NFTA_SET_FLAGS, unix.NFT_SET_INTERVAL)
		ae.Uint32(unix.NFTA_SET_KEY_TYPE, keyType.GetNFTMagic())
		ae.Uint32(unix.NFTA_SET_KEY_LEN, keyType.Bytes)
		ae.Uint32(unix.NFTA_SET_ID, id)
		return nil
	}); err != nil {
		return err
	}
	if len(elems) == 0 {
		return nil
	}
	return b.add(t.Family, unix.NFT_MSG_NEWSETELEM, netlink.Create|netlink.Excl, func(ae *netlink.AttributeEncoder) error {
		ae.String(unix.NFTA_SET_ELEM_LIST_TABLE, t.Name)
		ae.String(unix.NFTA_SET_ELEM_LIST_SET, s.Name)
		ae.Uint32(unix.NFTA_SET_ELEM_LIST_SET_ID, id)
		ae.Nested(unix.NFTA_SET_ELEM_LIST_ELEMENTS, func(list *netlink.AttributeEncoder) error {
			for _, e := range elems {
				list.Nested(unix.NFTA_LIST_ELEM, func(el *netlink.AttributeEncoder) error {
					el.Nested(unix.NFTA_SET_ELEM_KEY, func(key *netlink.AttributeEncoder) error {
						key.Bytes(unix.NFTA_DATA_VALUE, e.key)
						return nil
					})
					if e.end {
						el.Uint32(unix.NFTA_SET_ELEM_FLAGS, unix.NFT_SET_ELEM_INTERVAL_END)
					}
					if e.open {
						el.Bytes(unix.NFTA_SET_ELEM_USERDATA,
							userdata.AppendUint32(nil, userdata.NFTNL_UDATA_SET_ELEM_FLAGS, elemFlagIntervalOpen))
					}
					return nil
				})
			}
			return nil
		})
		return nil
	})
}

// elemFlagIntervalOpen is libnftnl's NFTNL_SET_ELEM_F_INTERVAL_OPEN: the
// interval runs to the end of the address space, so it has no end element.
// nft needs it to list such an interval correctly.
const elemFlagIntervalOpen = 1

type setElement struct {
	key       []byte
	end, open bool
}

// setElements encodes intervals the way nft does: a start element per interval
// and an end element (flagged) at the address after it, unless the interval
// runs to the last address; and, if the first interval does not start at the
// zero address, an end element there first.
func setElements(f Family, ivs []Interval) ([]setElement, error) {
	var out []setElement
	var prev netip.Addr
	for i, iv := range ivs {
		switch {
		case !iv.First.IsValid() || !iv.Last.IsValid() || familyOf(iv.First) != f || familyOf(iv.Last) != f ||
			iv.First.Is4In6() || iv.First.Zone() != "" || iv.Last.Zone() != "":
			return nil, fmt.Errorf("element %d (%s-%s): not a plain %s interval", i, iv.First, iv.Last, f.human())
		case iv.Last.Less(iv.First):
			return nil, fmt.Errorf("element %d (%s): ends before it starts", i, iv)
		case i > 0 && (!prev.Next().IsValid() || iv.First.Compare(prev.Next()) <= 0):
			return nil, fmt.Errorf("element %d (%s): overlaps or touches the one before; merge them", i, iv)
		}
		prev = iv.Last
		if i == 0 && !iv.First.IsUnspecified() {
			out = append(out, setElement{key: make([]byte, iv.First.BitLen()/8), end: true})
		}
		end := iv.Last.Next()
		out = append(out, setElement{key: iv.First.AsSlice(), open: !end.IsValid()})
		if end.IsValid() {
			out = append(out, setElement{key: end.AsSlice(), end: true})
		}
	}
	return out, nil
}

func (b *batch) addChain(t Table, c Chain) error {
	var hooknum, policy uint32
	if h := c.Hook; h != nil {
		var ok bool
		if hooknum, ok = hookNumber(h.Hook); !ok {
			return fmt.Errorf("unknown hook %q", h.Hook)
		}
		switch h.Policy {
		case "accept":
			policy = uint32(nftables.ChainPolicyAccept)
		case "drop":
			policy = uint32(nftables.ChainPolicyDrop)
		default:
			return fmt.Errorf("unknown policy %q", h.Policy)
		}
	}
	return b.add(t.Family, unix.NFT_MSG_NEWCHAIN, netlink.Create|netlink.Excl, func(ae *netlink.AttributeEncoder) error {
		ae.String(unix.NFTA_CHAIN_TABLE, t.Name)
		ae.String(unix.NFTA_CHAIN_NAME, c.Name)
		if h := c.Hook; h != nil {
			ae.Nested(unix.NFTA_CHAIN_HOOK, func(hae *netlink.AttributeEncoder) error {
				hae.Uint32(unix.NFTA_HOOK_HOOKNUM, hooknum)
				hae.Uint32(unix.NFTA_HOOK_PRIORITY, uint32(h.Priority))
				return nil
			})
			ae.Uint32(unix.NFTA_CHAIN_POLICY, policy)
			ae.String(unix.NFTA_CHAIN_TYPE, h.Type)
		}
		return nil
	})
}

var hookNames = [...]string{
	unix.NF_INET_PRE_ROUTING:  "prerouting",
	unix.NF_INET_LOCAL_IN:     "input",
	unix.NF_INET_FORWARD:      "forward",
	unix.NF_INET_LOCAL_OUT:    "output",
	unix.NF_INET_POST_ROUTING: "postrouting",
}

func hookNumber(name string) (uint32, bool) {
	i := slices.Index(hookNames[:], name)
	return uint32(i), i >= 0
}

func (b *batch) addRule(t Table, c Chain, r Rule, setIDs map[string]uint32) error {
	for _, name := range []string{r.SourceInSet, r.DestNotInSet} {
		if _, ok := setIDs[name]; name != "" && !ok {
			return fmt.Errorf("set %q is not in the table", name)
		}
	}
	if len(r.Comment) > maxCommentLength {
		return fmt.Errorf("comment longer than %d bytes", maxCommentLength)
	}
	es, err := ruleExprs(t.Family, r, func(name string) uint32 { return setIDs[name] })
	if err != nil {
		return err
	}
	encoded := make([][]byte, len(es))
	for i, e := range es {
		if encoded[i], err = marshalExpr(t.Family, e); err != nil {
			return err
		}
	}
	return b.add(t.Family, unix.NFT_MSG_NEWRULE, netlink.Create|netlink.Append, func(ae *netlink.AttributeEncoder) error {
		ae.String(unix.NFTA_RULE_TABLE, t.Name)
		ae.String(unix.NFTA_RULE_CHAIN, c.Name)
		ae.Nested(unix.NFTA_RULE_EXPRESSIONS, func(list *netlink.AttributeEncoder) error {
			for _, b := range encoded {
				list.Bytes(unix.NLA_F_NESTED|unix.NFTA_LIST_ELEM, b)
			}
			return nil
		})
		if r.Comment != "" {
			ae.Bytes(unix.NFTA_RULE_USERDATA, userdata.AppendString(nil, userdata.TypeComment, r.Comment))
		}
		return nil
	})
}

// marshalExpr is expr.Marshal, except for masquerade with a port range, which
// google/nftables encodes without flags (see the package comment): here it
// gets NF_NAT_RANGE_PROTO_SPECIFIED, without which the kernel ignores the
// range, and its fully-random flag.
func marshalExpr(f Family, e expr.Any) ([]byte, error) {
	m, ok := e.(*expr.Masq)
	if !ok || !m.ToPorts {
		return expr.Marshal(byte(nftFamily(f)), e)
	}
	flags := uint32(unix.NF_NAT_RANGE_PROTO_SPECIFIED)
	if m.Random {
		flags |= unix.NF_NAT_RANGE_PROTO_RANDOM
	}
	if m.FullyRandom {
		flags |= unix.NF_NAT_RANGE_PROTO_RANDOM_FULLY
	}
	if m.Persistent {
		flags |= unix.NF_NAT_RANGE_PERSISTENT
	}
	ae := netlink.NewAttributeEncoder()
	ae.ByteOrder = binary.BigEndian
	ae.String(unix.NFTA_EXPR_NAME, "masq")
	ae.Nested(unix.NFTA_EXPR_DATA, func(d *netlink.AttributeEncoder) error {
		d.Uint32(unix.NFTA_MASQ_FLAGS, flags)
		d.Uint32(unix.NFTA_MASQ_REG_PROTO_MIN, m.RegProtoMin)
		d.Uint32(unix.NFTA_MASQ_REG_PROTO_MAX, m.RegProtoMax)
		return nil
	})
	return ae.Encode()
}

func decodeSet(f Family, s *nftables.Set, elems []nftables.SetElement) Set {
	out := Set{Name: s.Name}
	if s.Anonymous || s.IsMap || s.HasTimeout || s.Concatenation || s.Dynamic || !s.Interval ||
		s.KeyType.Name != f.addrType() {
		out.Unrecognized = fmt.Sprintf("type %s, interval %v, map %v, timeout %v, concatenation %v, dynamic %v, anonymous %v",
			s.KeyType.Name, s.Interval, s.IsMap, s.HasTimeout, s.Concatenation, s.Dynamic, s.Anonymous)
		return out
	}
	ivs, err := intervalsFromElements(f, elems)
	if err != nil {
		out.Unrecognized = err.Error()
		return out
	}
	out.Elements = ivs
	return out
}

// intervalsFromElements is the inverse of setElements, for elements in any
// order (the kernel lists an interval set from the top).
func intervalsFromElements(f Family, elems []nftables.SetElement) ([]Interval, error) {
	type point struct {
		addr netip.Addr
		end  bool
	}
	points := make([]point, 0, len(elems))
	for _, e := range elems {
		a, ok := netip.AddrFromSlice(e.Key)
		if !ok || len(e.Key) != map[Family]int{IPv4: 4, IPv6: 16}[f] || len(e.KeyEnd) != 0 {
			return nil, fmt.Errorf("element key %x is not a %s address", e.Key, f.human())
		}
		points = append(points, point{a, e.IntervalEnd})
	}
	// Ascending; at the same address an end closes the interval before
	// another starts.
	slices.SortFunc(points, func(a, b point) int {
		if c := a.addr.Compare(b.addr); c != 0 {
			return c
		}
		switch {
		case a.end == b.end:
			return 0
		case a.end:
			return -1
		}
		return 1
	})
	var out []Interval
	var start netip.Addr
	for _, p := range points {
		switch {
		case !p.end && start.IsValid():
			return nil, fmt.Errorf("two interval starts without an end (%s, %s)", start, p.addr)
		case !p.end:
			start = p.addr
		case start.IsValid():
			out = append(out, Interval{start, p.addr.Prev()})
			start = netip.Addr{}
		default:
			// An end with no start: nft's leading end element at the zero
			// address, or an empty interval. Either matches nothing.
		}
	}
	if start.IsValid() {
		out = append(out, Interval{start, lastAddr(netip.PrefixFrom(start, 0))})
	}
	return out, nil
}

func decodeChain(c *nftables.Chain) Chain {
	out := Chain{Name: c.Name}
	if c.Hooknum == nil {
		return out
	}
	h := &Hook{Type: string(c.Type), Hook: fmt.Sprintf("hook-%d", *c.Hooknum), Policy: "accept"}
	if n := int(*c.Hooknum); n < len(hookNames) {
		h.Hook = hookNames[n]
	}
	if c.Priority != nil {
		h.Priority = int32(*c.Priority)
	}
	if c.Policy != nil {
		switch *c.Policy {
		case nftables.ChainPolicyAccept:
		case nftables.ChainPolicyDrop:
			h.Policy = "drop"
		default:
			h.Policy = fmt.Sprintf("policy-%d", *c.Policy)
		}
	}
	out.Hook = h
	return out
}

func decodeRule(f Family, r *nftables.Rule) Rule {
	out, ok := parseRule(f, r.Exprs)
	if !ok {
		return Rule{Unrecognized: describeExprs(r.Exprs)}
	}
	out.Comment = ruleComment(r.UserData)
	return out
}

// ruleComment reads nft's comment TLV from rule user data. Unlike
// userdata.GetString it does not trust the lengths.
func ruleComment(ud []byte) string {
	for len(ud) >= 2 {
		typ, n := ud[0], int(ud[1])
		if len(ud) < 2+n {
			break
		}
		if userdata.Type(typ) == userdata.TypeComment {
			c, _ := bytes.CutSuffix(ud[2:2+n], []byte{0})
			return string(c)
		}
		ud = ud[2+n:]
	}
	return ""
}
