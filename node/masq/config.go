package masq

import (
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
)

// DefaultTableName is the table kpr owns in the ip and ip6 families.
const DefaultTableName = "kpr"

// Names of the sets and chains in kpr's table.
const (
	SetPodCIDRs       = "pod-cidrs"
	SetNonMasqCIDRs   = "non-masquerade-cidrs"
	ChainPostrouting  = "postrouting"
	ChainMasquerading = "masquerading"
)

const (
	firstUnprivileged  = 1024
	priorityNATSource  = 100 // NF_IP_PRI_NAT_SRC, nft's "srcnat"
	maxTableNameLength = 255 // NFT_NAME_MAXLEN less the NUL
)

// PortRange is an inclusive range of ports. The zero value means "not set".
type PortRange struct {
	First, Last uint16
}

// IsZero reports whether r is the zero value.
func (r PortRange) IsZero() bool { return r == PortRange{} }

// Overlaps reports whether r and o share a port.
func (r PortRange) Overlaps(o PortRange) bool { return r.First <= o.Last && o.First <= r.Last }

func (r PortRange) String() string { return fmt.Sprintf("%d-%d", r.First, r.Last) }

// DefaultMasqPortRange is the kernel's default net.ipv4.ip_local_port_range.
func DefaultMasqPortRange() PortRange { return PortRange{32768, 60999} }

// SuggestedSNATPortRange is the range left for kpr's own eBPF SNAT: above the
// kernel's default ephemeral range, so neither node sockets nor masquerade (with
// DefaultMasqPortRange) use it. Pass it as Config.ReservedPortRange once that
// SNAT exists.
func SuggestedSNATPortRange() PortRange { return PortRange{61000, 65535} }

// Config is what the masquerade table is built from. Nothing in it depends on
// Services.
type Config struct {
	// PodCIDRs are the sources to masquerade: the cluster's pod CIDRs (kubeadm
	// podSubnet). A family gets a table only if it has a pod CIDR. Required: a
	// node that should not masquerade applies an empty Ruleset (or calls
	// Manager.Delete) instead.
	PodCIDRs []netip.Prefix
	// NonMasqCIDRs are destinations never masqueraded. They must cover
	// PodCIDRs (pod-to-pod traffic keeps its source) and may only be of a
	// family that has a pod CIDR. The caller fills the default: the pod and
	// Service CIDRs.
	NonMasqCIDRs []netip.Prefix
	// MasqPortRange is where masquerade puts TCP, UDP and SCTP connections
	// from unprivileged source ports. Zero: DefaultMasqPortRange.
	MasqPortRange PortRange
	// ReservedPortRange is a range masquerade must never pick, i.e. kpr's
	// own SNAT range; MasqPortRange may not overlap it. Zero: none.
	ReservedPortRange PortRange
	// TableName is the name of kpr's table in both families. Zero:
	// DefaultTableName.
	TableName string
}

// FieldError is a validation error of one Config field. Field is the Go field
// name, with an index for an element of a list ("PodCIDRs[1]").
type FieldError struct {
	Field string
	Msg   string
}

func (e *FieldError) Error() string { return "masq: Config." + e.Field + ": " + e.Msg }

// tableNameRE is nft's identifier syntax, so the table can be named on the nft
// command line.
var tableNameRE = regexp.MustCompile(`^[a-zA-Z_][a-zA-Z0-9_./-]*$`)

// withDefaults returns cfg with zero fields replaced by their defaults.
func (cfg Config) withDefaults() Config {
	if cfg.MasqPortRange.IsZero() {
		cfg.MasqPortRange = DefaultMasqPortRange()
	}
	if cfg.TableName == "" {
		cfg.TableName = DefaultTableName
	}
	return cfg
}

// Validate reports every problem of cfg (after defaulting), joined; each is a
// *FieldError.
func (cfg Config) Validate() error {
	cfg = cfg.withDefaults()
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, &FieldError{Field: field, Msg: fmt.Sprintf(format, args...)})
	}

	if len(cfg.TableName) > maxTableNameLength || !tableNameRE.MatchString(cfg.TableName) {
		bad("TableName", "%q is not an nftables identifier (letters, digits, _ . / -, starting with a letter or _, at most %d bytes)", cfg.TableName, maxTableNameLength)
	}

	if len(cfg.PodCIDRs) == 0 {
		bad("PodCIDRs", "empty: masquerade needs the pod CIDRs to know which sources to translate (to run without masquerade, apply an empty Ruleset or call Manager.Delete instead of building rules)")
	}
	podFamilies := map[Family]bool{}
	for i, p := range cfg.PodCIDRs {
		field := fmt.Sprintf("PodCIDRs[%d]", i)
		if msg := prefixProblem(p); msg != "" {
			bad(field, "%s", msg)
			continue
		}
		if p.Bits() == 0 {
			bad(field, "%s is a whole address family; pod CIDRs are the cluster's pod subnets", p)
			continue
		}
		podFamilies[familyOf(p.Addr())] = true
	}
	for i, p := range cfg.NonMasqCIDRs {
		field := fmt.Sprintf("NonMasqCIDRs[%d]", i)
		if msg := prefixProblem(p); msg != "" {
			bad(field, "%s", msg)
			continue
		}
		if fam := familyOf(p.Addr()); !podFamilies[fam] && len(cfg.PodCIDRs) > 0 {
			bad(field, "%s is %s, but PodCIDRs has no %s prefix, so there is no %s table to put it in", p, fam.human(), fam.human(), fam)
		}
	}
	for i, p := range cfg.PodCIDRs {
		if prefixProblem(p) != "" || p.Bits() == 0 {
			continue
		}
		if !covered(p, cfg.NonMasqCIDRs) {
			bad("NonMasqCIDRs", "does not cover PodCIDRs[%d] %s: traffic between pods would be masqueraded", i, p)
		}
	}

	checkRange := func(field string, r PortRange) bool {
		switch {
		case r.First == 0 || r.Last == 0:
			bad(field, "%s: ports start at 1", r)
		case r.First > r.Last:
			bad(field, "%s: first port is above the last", r)
		default:
			return true
		}
		return false
	}
	masqOK := checkRange("MasqPortRange", cfg.MasqPortRange)
	if masqOK && cfg.MasqPortRange.First < firstUnprivileged {
		bad("MasqPortRange", "%s: starts below %d; privileged source ports are masqueraded to privileged ports by the kernel, the range is for the others", cfg.MasqPortRange, firstUnprivileged)
	}
	if !cfg.ReservedPortRange.IsZero() && checkRange("ReservedPortRange", cfg.ReservedPortRange) && masqOK &&
		cfg.MasqPortRange.Overlaps(cfg.ReservedPortRange) {
		bad("MasqPortRange", "%s overlaps ReservedPortRange %s (kpr's SNAT ports)", cfg.MasqPortRange, cfg.ReservedPortRange)
	}
	return errors.Join(errs...)
}

// prefixProblem returns why p cannot be a set element, or "".
func prefixProblem(p netip.Prefix) string {
	switch {
	case !p.IsValid():
		return "not a valid CIDR"
	case p.Addr().Zone() != "":
		return fmt.Sprintf("%s has a zone", p)
	case p.Addr().Is4In6():
		return fmt.Sprintf("%s is IPv4-mapped IPv6; write IPv4 prefixes as IPv4 (kpr keeps one table per family)", p)
	case p.Masked() != p:
		return fmt.Sprintf("%s has host bits set (did you mean %s?)", p, p.Masked())
	}
	return ""
}

// covered reports whether every address of p is in one of the prefixes of by.
func covered(p netip.Prefix, by []netip.Prefix) bool {
	want := Interval{p.Addr(), lastAddr(p)}
	for _, iv := range mergePrefixes(by) {
		if iv.First.Compare(want.First) <= 0 && want.Last.Compare(iv.Last) <= 0 {
			return true
		}
	}
	return false
}

// Rules returns the tables that implement cfg: one per family with a pod CIDR,
// IPv4 first. It is a pure function of cfg; the error joins *FieldErrors.
func Rules(cfg Config) (Ruleset, error) {
	if err := cfg.Validate(); err != nil {
		return Ruleset{}, err
	}
	cfg = cfg.withDefaults()
	var rs Ruleset
	for _, fam := range []Family{IPv4, IPv6} {
		pods := prefixesOf(cfg.PodCIDRs, fam)
		if len(pods) == 0 {
			continue
		}
		rs.Tables = append(rs.Tables, Table{
			Family: fam,
			Name:   cfg.TableName,
			Sets: []Set{
				{Name: SetPodCIDRs, Elements: mergePrefixes(pods)},
				{Name: SetNonMasqCIDRs, Elements: mergePrefixes(prefixesOf(cfg.NonMasqCIDRs, fam))},
			},
			Chains: []Chain{
				{
					Name: ChainPostrouting,
					Hook: &Hook{Type: "nat", Hook: "postrouting", Priority: priorityNATSource, Policy: "accept"},
					Rules: []Rule{{
						SourceInSet:  SetPodCIDRs,
						DestNotInSet: SetNonMasqCIDRs,
						Jump:         ChainMasquerading,
						Comment:      "kpr: pod traffic leaving the cluster",
					}},
				},
				{Name: ChainMasquerading, Rules: masqueradingRules(cfg.MasqPortRange)},
			},
		})
	}
	return rs, nil
}

func masqueradingRules(ports PortRange) []Rule {
	var rules []Rule
	for _, proto := range []uint8{protoTCP, protoUDP, protoSCTP} {
		rules = append(rules, Rule{
			L4Proto:       proto,
			SourcePortMin: firstUnprivileged,
			Masquerade:    &Masquerade{Ports: ports, FullyRandom: true},
			Comment:       "kpr: unprivileged source ports stay out of the SNAT port range",
		})
	}
	return append(rules, Rule{
		Masquerade: &Masquerade{FullyRandom: true},
		Comment:    "kpr: privileged source ports stay privileged; protocols without ports",
	})
}

func prefixesOf(ps []netip.Prefix, fam Family) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range ps {
		if familyOf(p.Addr()) == fam {
			out = append(out, p)
		}
	}
	return out
}

func familyOf(a netip.Addr) Family {
	if a.Is4() {
		return IPv4
	}
	return IPv6
}

// mergePrefixes turns prefixes of one family into sorted, disjoint,
// non-adjacent intervals: the kernel rejects overlapping elements in an interval
// set, and nft would merge adjacent ones when listing.
func mergePrefixes(ps []netip.Prefix) []Interval {
	ivs := make([]Interval, 0, len(ps))
	for _, p := range ps {
		ivs = append(ivs, Interval{p.Masked().Addr(), lastAddr(p)})
	}
	slices.SortFunc(ivs, func(a, b Interval) int { return a.First.Compare(b.First) })
	var out []Interval
	for _, iv := range ivs {
		if n := len(out); n > 0 {
			last := &out[n-1]
			next := last.Last.Next()
			if !next.IsValid() || iv.First.Compare(next) <= 0 {
				if iv.Last.Compare(last.Last) > 0 {
					last.Last = iv.Last
				}
				continue
			}
		}
		out = append(out, iv)
	}
	return out
}

// lastAddr is the highest address of p.
func lastAddr(p netip.Prefix) netip.Addr {
	a := p.Masked().Addr()
	b := a.AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	out, _ := netip.AddrFromSlice(b)
	return out
}
