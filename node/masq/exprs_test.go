package masq

import (
	"encoding/binary"
	"net/netip"
	"reflect"
	"slices"
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

func dualStackRules(t *testing.T) Ruleset {
	t.Helper()
	rs, err := Rules(Config{
		PodCIDRs:     []netip.Prefix{podCIDR4, podCIDR6},
		NonMasqCIDRs: []netip.Prefix{podCIDR4, podCIDR6, svcCIDR4, svcCIDR6},
	})
	if err != nil {
		t.Fatal(err)
	}
	return rs
}

func TestRuleExprsRoundTrip(t *testing.T) {
	for _, tbl := range dualStackRules(t).Tables {
		for _, c := range tbl.Chains {
			for _, r := range c.Rules {
				es, err := ruleExprs(tbl.Family, r, func(string) uint32 { return 1 })
				if err != nil {
					t.Fatalf("%s %s: %v", tbl.Family, r.text(tbl.Family), err)
				}
				got, ok := parseRule(tbl.Family, es)
				want := r
				want.Comment = "" // kept in user data, not in expressions
				if !ok || !reflect.DeepEqual(got, want) {
					t.Errorf("%s: parseRule(ruleExprs(%q)) = %+v, %v", tbl.Family, r.text(tbl.Family), got, ok)
				}
			}
		}
	}
}

func TestRuleExprsMatchNft(t *testing.T) {
	// What nft 1.0.6 --debug=netlink prints for
	// "meta l4proto tcp th sport >= 1024 masquerade to :32768-60999 fully-random"
	// (the masq flags are checked in TestMarshalMasqWithPorts).
	r := Rule{L4Proto: protoTCP, SourcePortMin: 1024, Masquerade: &Masquerade{Ports: PortRange{32768, 60999}, FullyRandom: true}}
	es, err := ruleExprs(IPv4, r, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{6}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 2},
		&expr.Cmp{Op: expr.CmpOpGte, Register: 1, Data: []byte{0x04, 0x00}},
		&expr.Immediate{Register: 1, Data: []byte{0x80, 0x00}},
		&expr.Immediate{Register: 2, Data: []byte{0xee, 0x47}},
		&expr.Masq{ToPorts: true, FullyRandom: true, RegProtoMin: 1, RegProtoMax: 2},
	}
	if !reflect.DeepEqual(es, want) {
		t.Errorf("ruleExprs = %s\nwant %s", describeExprs(es), describeExprs(want))
	}
}

func TestParseRuleRejects(t *testing.T) {
	saddr := func(reg uint32) expr.Any {
		return &expr.Payload{DestRegister: reg, Base: expr.PayloadBaseNetworkHeader, Offset: 12, Len: 4}
	}
	lookup := func(reg uint32, inv bool) expr.Any {
		return &expr.Lookup{SourceRegister: reg, SetName: "pod-cidrs", Invert: inv}
	}
	masq := &expr.Masq{FullyRandom: true}
	for name, es := range map[string][]expr.Any{
		"empty":                   nil,
		"no action":               {saddr(1), lookup(1, false)},
		"counter":                 {&expr.Counter{}, masq},
		"two actions":             {masq, masq},
		"jump before a match":     {&expr.Verdict{Kind: expr.VerdictJump, Chain: "x"}, saddr(1), lookup(1, false)},
		"accept":                  {&expr.Verdict{Kind: expr.VerdictAccept}},
		"other register":          {saddr(1), lookup(2, false), masq},
		"inverted source lookup":  {saddr(1), lookup(1, true), masq},
		"IPv6 offset in ip table": {&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 8, Len: 16}, lookup(1, false), masq},
		"random masquerade":       {&expr.Masq{Random: true}},
		"persistent masquerade":   {&expr.Masq{Persistent: true}},
		"port without protocol": {
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Len: 2},
			&expr.Cmp{Op: expr.CmpOpGte, Register: 1, Data: []byte{4, 0}}, masq,
		},
		"port less-than": {
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1}, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{6}},
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Len: 2},
			&expr.Cmp{Op: expr.CmpOpLt, Register: 1, Data: []byte{4, 0}}, masq,
		},
		"ports into the wrong registers": {
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1}, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{6}},
			&expr.Immediate{Register: 1, Data: []byte{0x80, 0}}, &expr.Immediate{Register: 2, Data: []byte{0xee, 0x47}},
			&expr.Masq{ToPorts: true, RegProtoMin: 2, RegProtoMax: 1},
		},
	} {
		if r, ok := parseRule(IPv4, es); ok {
			t.Errorf("%s: parsed as %+v", name, r)
		}
	}
}

// masqAttrs returns the attributes inside a marshalled masq expression.
func masqAttrs(t *testing.T, b []byte) map[uint16][]byte {
	t.Helper()
	outer, err := netlink.UnmarshalAttributes(b)
	if err != nil {
		t.Fatal(err)
	}
	out := map[uint16][]byte{}
	for _, a := range outer {
		if a.Type&^unix.NLA_F_NESTED != unix.NFTA_EXPR_DATA {
			continue
		}
		inner, err := netlink.UnmarshalAttributes(a.Data)
		if err != nil {
			t.Fatal(err)
		}
		for _, ia := range inner {
			out[ia.Type] = ia.Data
		}
	}
	return out
}

// TestGoogleNftablesMasqDropsFlags documents why manager.go encodes masq
// itself. If it fails, google/nftables encodes the flags of a masquerade with
// a port range now, and marshalExpr can go back to expr.Marshal.
func TestGoogleNftablesMasqDropsFlags(t *testing.T) {
	b, err := expr.Marshal(byte(nftables.TableFamilyIPv4), &expr.Masq{ToPorts: true, FullyRandom: true, RegProtoMin: 1, RegProtoMax: 2})
	if err != nil {
		t.Fatal(err)
	}
	if flags, ok := masqAttrs(t, b)[unix.NFTA_MASQ_FLAGS]; ok {
		t.Errorf("google/nftables now encodes masq flags %x with a port range: use expr.Marshal for it in marshalExpr", flags)
	}
}

func TestMarshalMasqWithPorts(t *testing.T) {
	b, err := marshalExpr(IPv4, &expr.Masq{ToPorts: true, FullyRandom: true, RegProtoMin: 1, RegProtoMax: 2})
	if err != nil {
		t.Fatal(err)
	}
	attrs := masqAttrs(t, b)
	// nft: [ masq proto_min reg 1 proto_max reg 2 flags 0x12 ]
	for typ, want := range map[uint16]uint32{
		unix.NFTA_MASQ_FLAGS:         unix.NF_NAT_RANGE_PROTO_SPECIFIED | unix.NF_NAT_RANGE_PROTO_RANDOM_FULLY,
		unix.NFTA_MASQ_REG_PROTO_MIN: 1,
		unix.NFTA_MASQ_REG_PROTO_MAX: 2,
	} {
		if got := attrs[typ]; len(got) != 4 || binary.BigEndian.Uint32(got) != want {
			t.Errorf("masq attribute %d = %x, want %#x", typ, got, want)
		}
	}
	// Without a range google/nftables' encoding is used unchanged.
	b, err = marshalExpr(IPv4, &expr.Masq{FullyRandom: true})
	if err != nil {
		t.Fatal(err)
	}
	if got := masqAttrs(t, b)[unix.NFTA_MASQ_FLAGS]; binary.BigEndian.Uint32(got) != unix.NF_NAT_RANGE_PROTO_RANDOM_FULLY {
		t.Errorf("masq without ports: flags %x", got)
	}
}

func TestSetElementsRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		f    Family
		ivs  []Interval
		keys []string // start keys, and end keys with a trailing "]"
	}{
		{IPv4, nil, nil},
		{IPv4, ivs("10.244.0.0/16"), []string{"0.0.0.0]", "10.244.0.0", "10.245.0.0]"}},
		{IPv4, ivs("0.0.0.0/8", "10.0.0.0-12.255.255.255"), []string{"0.0.0.0", "1.0.0.0]", "10.0.0.0", "13.0.0.0]"}},
		{IPv4, ivs("10.96.0.0/16", "240.0.0.0/4"), []string{"0.0.0.0]", "10.96.0.0", "10.97.0.0]", "240.0.0.0"}},
		{IPv4, ivs("0.0.0.0/0"), []string{"0.0.0.0"}},
		{IPv4, ivs("10.0.0.1/32"), []string{"0.0.0.0]", "10.0.0.1", "10.0.0.2]"}},
		{IPv6, ivs("fd6b:7072:96::/112", "fd6b:7072:244::/56"), []string{"::]", "fd6b:7072:96::", "fd6b:7072:96::1:0]", "fd6b:7072:244::", "fd6b:7072:244:100::]"}},
		{IPv6, ivs("ff00::/8"), []string{"::]", "ff00::"}},
	} {
		elems, err := setElements(tc.f, tc.ivs)
		if err != nil {
			t.Fatalf("%v: %v", tc.ivs, err)
		}
		var keys []string
		var ne []nftables.SetElement
		for _, e := range elems {
			a, _ := netip.AddrFromSlice(e.key)
			k := a.String()
			if e.end {
				k += "]"
			}
			keys = append(keys, k)
			ne = append(ne, nftables.SetElement{Key: e.key, IntervalEnd: e.end})
		}
		if want := tc.keys; !slices.Equal(keys, want) {
			t.Errorf("%v: keys %v, want %v", tc.ivs, keys, want)
		}
		// The last interval of a set is open when it runs to the top.
		for i, e := range elems {
			top := i == len(elems)-1 && !e.end && len(tc.ivs) > 0 && !tc.ivs[len(tc.ivs)-1].Last.Next().IsValid()
			if e.open != top {
				t.Errorf("%v: element %d open=%v", tc.ivs, i, e.open)
			}
		}
		// The kernel lists interval sets from the top: decode reversed.
		slices.Reverse(ne)
		got, err := intervalsFromElements(tc.f, ne)
		if err != nil {
			t.Fatalf("%v: %v", tc.ivs, err)
		}
		if !slices.Equal(got, tc.ivs) {
			t.Errorf("intervalsFromElements(setElements(%v)) = %v", tc.ivs, got)
		}
	}
}

func TestSetElementsRejects(t *testing.T) {
	for name, tc := range map[string]struct {
		f   Family
		ivs []Interval
	}{
		"overlap":      {IPv4, ivs("10.0.0.0/8", "10.1.0.0/16")},
		"adjacent":     {IPv4, ivs("10.0.0.0/8", "11.0.0.0/8")},
		"unsorted":     {IPv4, ivs("11.0.0.0/8", "10.0.0.0/8")},
		"wrong family": {IPv4, ivs("fd00::/8")},
		"reversed":     {IPv4, []Interval{{netip.MustParseAddr("10.0.0.2"), netip.MustParseAddr("10.0.0.1")}}},
		"invalid":      {IPv6, []Interval{{}}},
	} {
		if _, err := setElements(tc.f, tc.ivs); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}
