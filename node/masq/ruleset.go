package masq

import (
	"fmt"
	"net/netip"
	"reflect"
	"strconv"
	"strings"
)

// Family is an nftables address family kpr keeps a table in.
type Family string

// The families kpr writes tables in. The values are nft's family names.
const (
	IPv4 Family = "ip"
	IPv6 Family = "ip6"
)

func (f Family) human() string {
	if f == IPv4 {
		return "IPv4"
	}
	return "IPv6"
}

func (f Family) addrType() string {
	if f == IPv4 {
		return "ipv4_addr"
	}
	return "ipv6_addr"
}

func (f Family) valid() bool { return f == IPv4 || f == IPv6 }

// Ruleset is the content of kpr's tables as plain data: what Rules wants and
// what Manager.Current reads back. An empty Ruleset means "no tables".
type Ruleset struct {
	Tables []Table
}

// Table is one nftables table.
type Table struct {
	Family Family
	Name   string
	Sets   []Set
	Chains []Chain
}

// Set is a named interval set of addresses of the table's family.
type Set struct {
	Name     string
	Elements []Interval // sorted, disjoint, not adjacent
	// Unrecognized is set by Manager.Current for a set that is not an
	// address interval set of the table's family; it never compares equal to
	// a set Rules builds.
	Unrecognized string
}

// Interval is an inclusive range of addresses.
type Interval struct {
	First, Last netip.Addr
}

// Chain is a chain and its rules in order. Hook is nil for a regular chain.
type Chain struct {
	Name  string
	Hook  *Hook
	Rules []Rule
}

// Hook makes a chain a base chain.
type Hook struct {
	Type     string // "nat"
	Hook     string // "postrouting"
	Priority int32
	Policy   string // "accept" or "drop"
}

// Rule is one rule in the small vocabulary this package writes. Its matches
// are ANDed in field order; exactly one of Jump and Masquerade is the action.
type Rule struct {
	SourceInSet   string // ip saddr @SourceInSet
	DestNotInSet  string // ip daddr != @DestNotInSet
	L4Proto       uint8  // meta l4proto L4Proto; 0: any
	SourcePortMin uint16 // th sport >= SourcePortMin; 0: any (needs L4Proto)
	Jump          string
	Masquerade    *Masquerade
	Comment       string
	// Unrecognized is set by Manager.Current for a rule outside this
	// vocabulary (its expressions, for display); it never compares equal to
	// a rule Rules builds.
	Unrecognized string
}

// Masquerade is nft's masquerade statement.
type Masquerade struct {
	Ports       PortRange // zero: the kernel's choice
	FullyRandom bool
}

// IP protocol numbers used in rules.
const (
	protoTCP  = 6
	protoUDP  = 17
	protoSCTP = 132
)

// RuleCount is the number of rules in all tables.
func (rs Ruleset) RuleCount() int {
	n := 0
	for _, t := range rs.Tables {
		for _, c := range t.Chains {
			n += len(c.Rules)
		}
	}
	return n
}

// Table returns the table of family f, if any.
func (rs Ruleset) Table(f Family) (Table, bool) {
	for _, t := range rs.Tables {
		if t.Family == f {
			return t, true
		}
	}
	return Table{}, false
}

// Equal reports whether rs and o describe the same tables in the same order;
// nil and empty lists are the same.
func (rs Ruleset) Equal(o Ruleset) bool {
	return reflect.DeepEqual(rs.normalized(), o.normalized())
}

func (rs Ruleset) normalized() Ruleset {
	var out Ruleset
	for _, t := range rs.Tables {
		nt := Table{Family: t.Family, Name: t.Name}
		for _, s := range t.Sets {
			ns := Set{Name: s.Name, Unrecognized: s.Unrecognized}
			if len(s.Elements) > 0 {
				ns.Elements = s.Elements
			}
			nt.Sets = append(nt.Sets, ns)
		}
		for _, c := range t.Chains {
			nc := Chain{Name: c.Name, Hook: c.Hook}
			if len(c.Rules) > 0 {
				nc.Rules = c.Rules
			}
			nt.Chains = append(nt.Chains, nc)
		}
		out.Tables = append(out.Tables, nt)
	}
	return out
}

// String renders rs in nft's syntax, loadable with nft -f unless something is
// Unrecognized.
func (rs Ruleset) String() string {
	var b strings.Builder
	for i, t := range rs.Tables {
		if i > 0 {
			b.WriteString("\n")
		}
		t.write(&b)
	}
	return b.String()
}

func (t Table) write(b *strings.Builder) {
	fmt.Fprintf(b, "table %s %s {\n", t.Family, t.Name)
	first := true
	sep := func() {
		if !first {
			b.WriteString("\n")
		}
		first = false
	}
	for _, s := range t.Sets {
		sep()
		fmt.Fprintf(b, "\tset %s {\n", s.Name)
		if s.Unrecognized != "" {
			fmt.Fprintf(b, "\t\t# unrecognized: %s\n", s.Unrecognized)
		} else {
			fmt.Fprintf(b, "\t\ttype %s\n\t\tflags interval\n", t.Family.addrType())
		}
		if len(s.Elements) > 0 {
			elems := make([]string, len(s.Elements))
			for i, e := range s.Elements {
				elems[i] = e.String()
			}
			fmt.Fprintf(b, "\t\telements = { %s }\n", strings.Join(elems, ", "))
		}
		b.WriteString("\t}\n")
	}
	for _, c := range t.Chains {
		sep()
		fmt.Fprintf(b, "\tchain %s {\n", c.Name)
		if h := c.Hook; h != nil {
			fmt.Fprintf(b, "\t\ttype %s hook %s priority %s; policy %s;\n", h.Type, h.Hook, h.priority(), h.Policy)
		}
		for _, r := range c.Rules {
			fmt.Fprintf(b, "\t\t%s\n", r.text(t.Family))
		}
		b.WriteString("\t}\n")
	}
	b.WriteString("}\n")
}

func (h Hook) priority() string {
	if h.Type == "nat" && h.Hook == "postrouting" && h.Priority == priorityNATSource {
		return "srcnat"
	}
	return strconv.Itoa(int(h.Priority))
}

func (r Rule) text(fam Family) string {
	if r.Unrecognized != "" {
		return "# unrecognized: " + r.Unrecognized
	}
	var parts []string
	if r.SourceInSet != "" {
		parts = append(parts, fmt.Sprintf("%s saddr @%s", fam, r.SourceInSet))
	}
	if r.DestNotInSet != "" {
		parts = append(parts, fmt.Sprintf("%s daddr != @%s", fam, r.DestNotInSet))
	}
	if r.L4Proto != 0 {
		parts = append(parts, "meta l4proto "+protoName(r.L4Proto))
	}
	if r.SourcePortMin != 0 {
		parts = append(parts, fmt.Sprintf("th sport >= %d", r.SourcePortMin))
	}
	if r.Jump != "" {
		parts = append(parts, "jump "+r.Jump)
	}
	if m := r.Masquerade; m != nil {
		s := "masquerade"
		if !m.Ports.IsZero() {
			s += " to :" + m.Ports.String()
		}
		if m.FullyRandom {
			s += " fully-random"
		}
		parts = append(parts, s)
	}
	if r.Comment != "" {
		parts = append(parts, strconv.Quote(r.Comment))
		parts[len(parts)-1] = "comment " + parts[len(parts)-1]
	}
	return strings.Join(parts, " ")
}

func protoName(p uint8) string {
	switch p {
	case protoTCP:
		return "tcp"
	case protoUDP:
		return "udp"
	case protoSCTP:
		return "sctp"
	}
	return strconv.Itoa(int(p))
}

// String renders iv the way nft lists set elements: a prefix when it is one,
// otherwise first-last.
func (iv Interval) String() string {
	if iv.First == iv.Last {
		return iv.First.String()
	}
	if p, ok := iv.prefix(); ok {
		return p.String()
	}
	return iv.First.String() + "-" + iv.Last.String()
}

func (iv Interval) prefix() (netip.Prefix, bool) {
	for bits := 0; bits <= iv.First.BitLen(); bits++ {
		p := netip.PrefixFrom(iv.First, bits)
		if p.Masked().Addr() == iv.First && lastAddr(p) == iv.Last {
			return p, true
		}
	}
	return netip.Prefix{}, false
}
