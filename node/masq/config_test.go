package masq

import (
	"errors"
	"fmt"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"
)

// The test cluster's CIDRs (docs/ARCHITECTURE.md, "Test addressing").
var (
	podCIDR4 = netip.MustParsePrefix("10.244.0.0/16")
	podCIDR6 = netip.MustParsePrefix("fd6b:7072:244::/56")
	svcCIDR4 = netip.MustParsePrefix("10.96.0.0/16")
	svcCIDR6 = netip.MustParsePrefix("fd6b:7072:96::/112")
)

func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }

func iv(s string) Interval {
	if first, last, ok := strings.Cut(s, "-"); ok {
		return Interval{netip.MustParseAddr(first), netip.MustParseAddr(last)}
	}
	p := pfx(s)
	return Interval{p.Addr(), lastAddr(p)}
}

func ivs(ss ...string) []Interval {
	out := make([]Interval, len(ss))
	for i, s := range ss {
		out[i] = iv(s)
	}
	return out
}

// wantTable is the table Rules builds for one family with default ports.
func wantTable(f Family, name string, pods, nonMasq []Interval, ports PortRange) Table {
	rule := func(proto uint8) Rule {
		return Rule{
			L4Proto: proto, SourcePortMin: 1024,
			Masquerade: &Masquerade{Ports: ports, FullyRandom: true},
			Comment:    "kpr: unprivileged source ports stay out of the SNAT port range",
		}
	}
	return Table{
		Family: f,
		Name:   name,
		Sets: []Set{
			{Name: "pod-cidrs", Elements: pods},
			{Name: "non-masquerade-cidrs", Elements: nonMasq},
		},
		Chains: []Chain{
			{
				Name: "postrouting",
				Hook: &Hook{Type: "nat", Hook: "postrouting", Priority: 100, Policy: "accept"},
				Rules: []Rule{{
					SourceInSet: "pod-cidrs", DestNotInSet: "non-masquerade-cidrs", Jump: "masquerading",
					Comment: "kpr: pod traffic leaving the cluster",
				}},
			},
			{
				Name: "masquerading",
				Rules: []Rule{
					rule(6), rule(17), rule(132),
					{
						Masquerade: &Masquerade{FullyRandom: true},
						Comment:    "kpr: privileged source ports stay privileged; protocols without ports",
					},
				},
			},
		},
	}
}

func TestRules(t *testing.T) {
	def := DefaultMasqPortRange()
	v4 := wantTable(IPv4, "kpr", ivs("10.244.0.0/16"), ivs("10.96.0.0/16", "10.244.0.0/16"), def)
	v6 := wantTable(IPv6, "kpr", ivs("fd6b:7072:244::/56"), ivs("fd6b:7072:96::/112", "fd6b:7072:244::/56"), def)
	for _, tc := range []struct {
		name string
		cfg  Config
		want Ruleset
	}{
		{
			name: "IPv4 only",
			cfg:  Config{PodCIDRs: []netip.Prefix{podCIDR4}, NonMasqCIDRs: []netip.Prefix{podCIDR4, svcCIDR4}},
			want: Ruleset{Tables: []Table{v4}},
		},
		{
			name: "IPv6 only",
			cfg:  Config{PodCIDRs: []netip.Prefix{podCIDR6}, NonMasqCIDRs: []netip.Prefix{podCIDR6, svcCIDR6}},
			want: Ruleset{Tables: []Table{v6}},
		},
		{
			name: "dual-stack, IPv6 listed first, IPv4 table still first",
			cfg: Config{
				PodCIDRs:     []netip.Prefix{podCIDR6, podCIDR4},
				NonMasqCIDRs: []netip.Prefix{svcCIDR6, podCIDR4, podCIDR6, svcCIDR4},
			},
			want: Ruleset{Tables: []Table{v4, v6}},
		},
		{
			name: "overlapping and adjacent CIDRs are merged into disjoint intervals",
			cfg: Config{
				PodCIDRs: []netip.Prefix{pfx("10.244.0.0/17"), pfx("10.244.128.0/17"), pfx("10.245.0.0/16")},
				NonMasqCIDRs: []netip.Prefix{
					pfx("192.168.1.0/24"), pfx("10.0.0.0/8"), pfx("10.244.0.0/16"), pfx("11.0.0.0/8"),
					pfx("192.168.0.0/16"), pfx("203.0.113.7/32"), pfx("240.0.0.0/4"),
				},
			},
			want: Ruleset{Tables: []Table{wantTable(IPv4, "kpr",
				ivs("10.244.0.0/15"),
				ivs("10.0.0.0-11.255.255.255", "192.168.0.0/16", "203.0.113.7/32", "240.0.0.0/4"), def)}},
		},
		{
			name: "port range and table name",
			cfg: Config{
				PodCIDRs: []netip.Prefix{podCIDR4}, NonMasqCIDRs: []netip.Prefix{podCIDR4},
				MasqPortRange: PortRange{40000, 49999}, ReservedPortRange: PortRange{50000, 65535},
				TableName: "kpr-test",
			},
			want: Ruleset{Tables: []Table{wantTable(IPv4, "kpr-test", ivs("10.244.0.0/16"), ivs("10.244.0.0/16"), PortRange{40000, 49999})}},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Rules(tc.cfg)
			if err != nil {
				t.Fatal(err)
			}
			if !got.Equal(tc.want) {
				t.Errorf("Rules:\n%s\nwant:\n%s", got, tc.want)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("Rules is Equal but not DeepEqual to the expectation:\n%#v", got)
			}
		})
	}
}

func TestRulesText(t *testing.T) {
	rs, err := Rules(Config{PodCIDRs: []netip.Prefix{podCIDR4}, NonMasqCIDRs: []netip.Prefix{podCIDR4, svcCIDR4}})
	if err != nil {
		t.Fatal(err)
	}
	want := `table ip kpr {
	set pod-cidrs {
		type ipv4_addr
		flags interval
		elements = { 10.244.0.0/16 }
	}

	set non-masquerade-cidrs {
		type ipv4_addr
		flags interval
		elements = { 10.96.0.0/16, 10.244.0.0/16 }
	}

	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		ip saddr @pod-cidrs ip daddr != @non-masquerade-cidrs jump masquerading comment "kpr: pod traffic leaving the cluster"
	}

	chain masquerading {
		meta l4proto tcp th sport >= 1024 masquerade to :32768-60999 fully-random comment "kpr: unprivileged source ports stay out of the SNAT port range"
		meta l4proto udp th sport >= 1024 masquerade to :32768-60999 fully-random comment "kpr: unprivileged source ports stay out of the SNAT port range"
		meta l4proto sctp th sport >= 1024 masquerade to :32768-60999 fully-random comment "kpr: unprivileged source ports stay out of the SNAT port range"
		masquerade fully-random comment "kpr: privileged source ports stay privileged; protocols without ports"
	}
}
`
	if got := rs.String(); got != want {
		t.Errorf("String:\n%s\nwant:\n%s", got, want)
	}
}

func TestIntervalString(t *testing.T) {
	for in, want := range map[string]string{
		"10.0.0.0/8":              "10.0.0.0/8",
		"10.0.0.0-11.255.255.255": "10.0.0.0/7",
		"10.0.0.0-12.255.255.255": "10.0.0.0-12.255.255.255",
		"10.0.0.1-10.0.0.1":       "10.0.0.1",
		"0.0.0.0/0":               "0.0.0.0/0",
		"fd6b:7072:96::/112":      "fd6b:7072:96::/112",
		"fd6b::1-fd6b::2":         "fd6b::1-fd6b::2",
	} {
		if got := iv(in).String(); got != want {
			t.Errorf("%s: got %s, want %s", in, got, want)
		}
	}
}

func TestRulesValidation(t *testing.T) {
	base := func(mod func(*Config)) Config {
		cfg := Config{PodCIDRs: []netip.Prefix{podCIDR4}, NonMasqCIDRs: []netip.Prefix{podCIDR4, svcCIDR4}}
		mod(&cfg)
		return cfg
	}
	for _, tc := range []struct {
		name  string
		cfg   Config
		field string // the FieldError's Field
		msg   string // a substring of its message
	}{
		{"no pod CIDRs", Config{NonMasqCIDRs: []netip.Prefix{svcCIDR4}}, "PodCIDRs", "empty"},
		{"invalid pod CIDR", base(func(c *Config) { c.PodCIDRs = append(c.PodCIDRs, netip.Prefix{}) }), "PodCIDRs[1]", "not a valid CIDR"},
		{"host bits", base(func(c *Config) { c.PodCIDRs = []netip.Prefix{pfx("10.244.1.5/16")} }), "PodCIDRs[0]", "did you mean 10.244.0.0/16"},
		{"IPv4-mapped pod CIDR", base(func(c *Config) { c.PodCIDRs = []netip.Prefix{pfx("::ffff:10.244.0.0/112")} }), "PodCIDRs[0]", "IPv4-mapped"},
		{"IPv4-mapped non-masquerade CIDR", base(func(c *Config) { c.NonMasqCIDRs = append(c.NonMasqCIDRs, pfx("::ffff:10.0.0.0/104")) }), "NonMasqCIDRs[2]", "IPv4-mapped"},
		{"whole family as pod CIDR", base(func(c *Config) { c.PodCIDRs = []netip.Prefix{pfx("0.0.0.0/0")}; c.NonMasqCIDRs = c.PodCIDRs }), "PodCIDRs[0]", "whole address family"},
		{"non-masquerade CIDR of a family without pods", base(func(c *Config) { c.NonMasqCIDRs = append(c.NonMasqCIDRs, svcCIDR6) }), "NonMasqCIDRs[2]", "PodCIDRs has no IPv6 prefix"},
		{"IPv4 non-masquerade CIDR on IPv6-only pods", Config{PodCIDRs: []netip.Prefix{podCIDR6}, NonMasqCIDRs: []netip.Prefix{podCIDR6, svcCIDR4}}, "NonMasqCIDRs[1]", "PodCIDRs has no IPv4 prefix"},
		{"pod CIDR not in non-masquerade CIDRs", base(func(c *Config) { c.NonMasqCIDRs = []netip.Prefix{svcCIDR4} }), "NonMasqCIDRs", "does not cover PodCIDRs[0] 10.244.0.0/16"},
		{"pod CIDR only partly in non-masquerade CIDRs", base(func(c *Config) { c.NonMasqCIDRs = []netip.Prefix{pfx("10.244.0.0/17")} }), "NonMasqCIDRs", "does not cover PodCIDRs[0]"},
		{"no non-masquerade CIDRs", base(func(c *Config) { c.NonMasqCIDRs = nil }), "NonMasqCIDRs", "does not cover PodCIDRs[0]"},
		{"port 0", base(func(c *Config) { c.MasqPortRange = PortRange{0, 5000} }), "MasqPortRange", "ports start at 1"},
		{"reversed port range", base(func(c *Config) { c.MasqPortRange = PortRange{5000, 4000} }), "MasqPortRange", "first port is above the last"},
		{"privileged port range", base(func(c *Config) { c.MasqPortRange = PortRange{1000, 5000} }), "MasqPortRange", "below 1024"},
		{"masquerade overlaps SNAT", base(func(c *Config) {
			c.MasqPortRange = PortRange{32768, 61000}
			c.ReservedPortRange = SuggestedSNATPortRange()
		}), "MasqPortRange", "overlaps ReservedPortRange 61000-65535"},
		{"default masquerade range overlaps SNAT", base(func(c *Config) { c.ReservedPortRange = PortRange{60000, 60000} }), "MasqPortRange", "32768-60999 overlaps"},
		{"bad reserved range", base(func(c *Config) { c.ReservedPortRange = PortRange{2, 1} }), "ReservedPortRange", "first port is above the last"},
		{"table name with a space", base(func(c *Config) { c.TableName = "kpr masq" }), "TableName", "not an nftables identifier"},
		{"table name starting with a digit", base(func(c *Config) { c.TableName = "1kpr" }), "TableName", "not an nftables identifier"},
		{"table name too long", base(func(c *Config) { c.TableName = strings.Repeat("k", 256) }), "TableName", "at most 255"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rs, err := Rules(tc.cfg)
			if err == nil {
				t.Fatalf("no error; rules:\n%s", rs)
			}
			if len(rs.Tables) != 0 {
				t.Errorf("rules returned with the error: %v", rs)
			}
			fes := fieldErrors(err)
			i := slices.IndexFunc(fes, func(fe *FieldError) bool { return fe.Field == tc.field })
			if i < 0 {
				t.Fatalf("no error for field %s: %v", tc.field, err)
			}
			if !strings.Contains(fes[i].Msg, tc.msg) {
				t.Errorf("error for %s = %q, want it to contain %q", tc.field, fes[i].Msg, tc.msg)
			}
			if want := "masq: Config." + tc.field + ": "; !strings.HasPrefix(fes[i].Error(), want) {
				t.Errorf("error %q does not start with %q", fes[i].Error(), want)
			}
		})
	}
}

func TestRulesValidationReportsEveryField(t *testing.T) {
	_, err := Rules(Config{
		PodCIDRs:      []netip.Prefix{pfx("10.244.0.1/16")},
		NonMasqCIDRs:  []netip.Prefix{svcCIDR6},
		MasqPortRange: PortRange{9, 8},
		TableName:     "-",
	})
	var fields []string
	for _, fe := range fieldErrors(err) {
		fields = append(fields, fe.Field)
	}
	slices.Sort(fields)
	want := []string{"MasqPortRange", "NonMasqCIDRs[0]", "PodCIDRs[0]", "TableName"}
	if !slices.Equal(fields, want) {
		t.Errorf("fields with errors = %v, want %v (error: %v)", fields, want, err)
	}
}

func fieldErrors(err error) []*FieldError {
	var out []*FieldError
	var joined interface{ Unwrap() []error }
	if errors.As(err, &joined) {
		for _, e := range joined.Unwrap() {
			out = append(out, fieldErrors(e)...)
		}
		return out
	}
	var fe *FieldError
	if errors.As(err, &fe) {
		out = append(out, fe)
	}
	return out
}

// testService is what the agent knows of a Service. This package never sees
// one: the helpers below show that a Service has nothing to add to Config.
type testService struct {
	Namespace, Name string
	ClusterIPs      []netip.Addr
	Ports           []uint16
}

// makeServices returns n dual-stack Services with ClusterIPs in the test
// Service CIDRs.
func makeServices(n int) []testService {
	out := make([]testService, n)
	for i := range out {
		hi, lo := byte((i+1)>>8), byte(i+1)
		v6 := svcCIDR6.Addr().As16()
		v6[14], v6[15] = hi, lo
		out[i] = testService{
			Namespace:  "default",
			Name:       fmt.Sprintf("svc-%d", i),
			ClusterIPs: []netip.Addr{netip.AddrFrom4([4]byte{10, 96, hi, lo}), netip.AddrFrom16(v6)},
			Ports:      []uint16{80, 443},
		}
	}
	return out
}

// configForServices builds the masquerade Config of a dual-stack cluster the
// way the agent does, given its Services. Every ClusterIP falls in a Service
// CIDR that is already a non-masquerade CIDR, so the Services contribute
// nothing; a ClusterIP outside would fail the test rather than add a rule.
func configForServices(t *testing.T, services []testService) Config {
	t.Helper()
	cfg := Config{
		PodCIDRs:     []netip.Prefix{podCIDR4, podCIDR6},
		NonMasqCIDRs: []netip.Prefix{podCIDR4, podCIDR6, svcCIDR4, svcCIDR6},
	}
	for _, s := range services {
		for _, ip := range s.ClusterIPs {
			if !svcCIDR4.Contains(ip) && !svcCIDR6.Contains(ip) {
				t.Fatalf("Service %s/%s: ClusterIP %s outside the Service CIDRs", s.Namespace, s.Name, ip)
			}
		}
	}
	return cfg
}

func TestRuleCountIndependentOfServices(t *testing.T) {
	one, err := Rules(configForServices(t, makeServices(1)))
	if err != nil {
		t.Fatal(err)
	}
	many, err := Rules(configForServices(t, makeServices(10_000)))
	if err != nil {
		t.Fatal(err)
	}
	if !many.Equal(one) {
		t.Errorf("rules for 10,000 Services differ from rules for 1:\n%s\nvs\n%s", many, one)
	}
	if got, want := many.RuleCount(), 10; got != want || one.RuleCount() != want {
		t.Errorf("rule count: 1 Service %d, 10,000 Services %d, want %d for both families", one.RuleCount(), got, want)
	}
	for _, tbl := range many.Tables {
		for _, s := range tbl.Sets {
			if len(s.Elements) > 2 {
				t.Errorf("table %s set %s has %d elements; Services must not add any", tbl.Family, s.Name, len(s.Elements))
			}
		}
	}
}

// TestConfigHasNoServiceInput pins Config's fields: none of them can carry
// per-Service data. A new field should be checked for that before it is added
// here.
func TestConfigHasNoServiceInput(t *testing.T) {
	var fields []string
	typ := reflect.TypeFor[Config]()
	for i := range typ.NumField() {
		f := typ.Field(i)
		fields = append(fields, f.Name+" "+f.Type.String())
	}
	want := []string{
		"PodCIDRs []netip.Prefix",
		"NonMasqCIDRs []netip.Prefix",
		"MasqPortRange masq.PortRange",
		"ReservedPortRange masq.PortRange",
		"TableName string",
	}
	if !slices.Equal(fields, want) {
		t.Errorf("Config fields = %q, want %q", fields, want)
	}
}

func TestMergePrefixes(t *testing.T) {
	for _, tc := range []struct {
		in   []string
		want []Interval
	}{
		{nil, nil},
		{[]string{"10.0.0.0/8", "10.1.0.0/16"}, ivs("10.0.0.0/8")},
		{[]string{"10.1.0.0/16", "10.0.0.0/8"}, ivs("10.0.0.0/8")},
		{[]string{"10.0.0.0/8", "11.0.0.0/8", "12.0.0.0/8"}, ivs("10.0.0.0-12.255.255.255")},
		{[]string{"10.0.0.0/8", "12.0.0.0/8"}, ivs("10.0.0.0/8", "12.0.0.0/8")},
		{[]string{"0.0.0.0/0", "10.0.0.0/8"}, ivs("0.0.0.0/0")},
		{[]string{"255.255.255.255/32", "255.255.255.254/32"}, ivs("255.255.255.254/31")},
		{[]string{"fd00::/8", "fd6b:7072:96::/112", "fe80::/10"}, ivs("fd00::/8", "fe80::/10")},
	} {
		var ps []netip.Prefix
		for _, s := range tc.in {
			ps = append(ps, pfx(s))
		}
		if got := mergePrefixes(ps); !slices.Equal(got, tc.want) {
			t.Errorf("mergePrefixes(%v) = %v, want %v", tc.in, got, tc.want)
		}
	}
}
