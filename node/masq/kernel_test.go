package masq

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
)

// foreignRuleset is someone else's nftables state in the test namespace,
// including a table named like kpr's in a family kpr does not use.
const foreignRuleset = `
table inet kpr {
	chain postrouting {
		type nat hook postrouting priority srcnat + 10; policy accept;
		ip saddr 192.0.2.0/24 masquerade
	}
}
table ip foreign {
	set peers {
		type ipv4_addr
		flags interval
		elements = { 198.51.100.0/24 }
	}
	chain postrouting {
		type nat hook postrouting priority srcnat - 10; policy accept;
		ip daddr @peers return
		counter
	}
}
table ip6 foreign6 {
	chain input {
		type filter hook input priority filter; policy accept;
		tcp dport 22 accept
	}
}
`

func mustRules(t *testing.T, cfg Config) Ruleset {
	t.Helper()
	rs, err := Rules(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return rs
}

// checkInstalled compares what the kernel has with want, read back both with
// Manager.Current and with nft -j list ruleset.
func checkInstalled(t *testing.T, ns *netns, m *Manager, want Ruleset) {
	t.Helper()
	got, err := m.Current()
	if err != nil {
		t.Fatal(err)
	}
	if !got.Equal(want) {
		t.Fatalf("Current:\n%s\nwant:\n%s", got, want)
	}

	objs := filterObjects(ns.listJSON(t), func(o nftObject) bool { return o.isKpr(m.table) })
	counts := map[string]int{}
	for _, o := range objs {
		kind, family, _ := o.describe()
		counts[family+" "+kind]++
		switch kind {
		case "set":
			checkSetJSON(t, want, family, o["set"])
		case "rule":
			checkRuleJSON(t, o["rule"])
		}
	}
	wantCounts := map[string]int{}
	for _, tbl := range want.Tables {
		f := string(tbl.Family)
		wantCounts[f+" table"] = 1
		wantCounts[f+" set"] = len(tbl.Sets)
		wantCounts[f+" chain"] = len(tbl.Chains)
		for _, c := range tbl.Chains {
			wantCounts[f+" rule"] += len(c.Rules)
		}
	}
	if fmt.Sprint(counts) != fmt.Sprint(wantCounts) {
		t.Errorf("nft lists %v in kpr's tables, want %v", counts, wantCounts)
	}
	checkMasqFlags(t, ns, want)
}

// checkMasqFlags checks the raw masq expressions: nft's listing shows a port
// range whether or not NF_NAT_RANGE_PROTO_SPECIFIED is set, but without it
// the kernel ignores the range.
func checkMasqFlags(t *testing.T, ns *netns, want Ruleset) {
	t.Helper()
	for _, tbl := range want.Tables {
		out := ns.run(t, "nft", "--debug=netlink", "list", "table", string(tbl.Family), tbl.Name)
		withPorts := 0
		for line := range strings.Lines(out) {
			if !strings.Contains(line, "[ masq ") {
				continue
			}
			if strings.Contains(line, "proto_min") {
				withPorts++
				if !strings.Contains(line, "flags 0x12 ]") {
					t.Errorf("table %s: %s: want flags 0x12 (proto-specified, fully-random)", tbl.Family, strings.TrimSpace(line))
				}
			} else if !strings.Contains(line, "flags 0x10 ]") {
				t.Errorf("table %s: %s: want flags 0x10 (fully-random)", tbl.Family, strings.TrimSpace(line))
			}
		}
		if withPorts != 3 {
			t.Errorf("table %s: %d masquerades with a port range, want 3:\n%s", tbl.Family, withPorts, out)
		}
	}
}

// checkSetJSON compares nft's rendering of a set's elements with want's.
func checkSetJSON(t *testing.T, want Ruleset, family string, set map[string]any) {
	t.Helper()
	tbl, ok := want.Table(Family(family))
	if !ok {
		t.Errorf("nft lists set %v in a table that should not exist", set["name"])
		return
	}
	var wantElems []string
	for _, s := range tbl.Sets {
		if s.Name == set["name"] {
			for _, e := range s.Elements {
				wantElems = append(wantElems, e.String())
			}
		}
	}
	var got []string
	elems, _ := set["elem"].([]any)
	for _, e := range elems {
		switch e := e.(type) {
		case string:
			got = append(got, e)
		case map[string]any:
			if p, ok := e["prefix"].(map[string]any); ok {
				got = append(got, fmt.Sprintf("%v/%v", p["addr"], p["len"]))
			} else if r, ok := e["range"].([]any); ok && len(r) == 2 {
				got = append(got, fmt.Sprintf("%v-%v", r[0], r[1]))
			} else {
				got = append(got, fmt.Sprint(e))
			}
		}
	}
	if fmt.Sprint(got) != fmt.Sprint(wantElems) {
		t.Errorf("nft lists set %s %v elements %v, want %v", family, set["name"], got, wantElems)
	}
}

// checkRuleJSON checks, in nft's own decoding, that a masquerade is fully
// random and that its port range is really there.
func checkRuleJSON(t *testing.T, rule map[string]any) {
	t.Helper()
	exprs, _ := rule["expr"].([]any)
	for _, e := range exprs {
		stmt, _ := e.(map[string]any)
		m, ok := stmt["masquerade"]
		if !ok {
			continue
		}
		mm, _ := m.(map[string]any)
		if fmt.Sprint(mm["flags"]) != "fully-random" {
			t.Errorf("rule %v: masquerade flags %v, want fully-random", rule["comment"], mm["flags"])
		}
		if strings.Contains(fmt.Sprint(rule["comment"]), "unprivileged") && mm["port"] == nil {
			t.Errorf("rule %v: masquerade has no port range in nft's listing: %v", rule["comment"], mm)
		}
	}
}

func TestKernelApplyCurrentDelete(t *testing.T) {
	requirePrivileged(t)
	ns := newNetns(t, "apply")
	ns.nft(t, foreignRuleset)
	foreign := func() string {
		return canonical(t, filterObjects(ns.listJSON(t), func(o nftObject) bool { return !o.isKpr(DefaultTableName) }))
	}
	foreignBefore := foreign()
	if !strings.Contains(foreignBefore, `"foreign6"`) || !strings.Contains(foreignBefore, `"inet"`) {
		t.Fatalf("foreign tables not set up:\n%s", foreignBefore)
	}
	gens := watchGenerations(t, ns)
	m := NewManager(ns.conn(t), "")

	dual := Config{
		PodCIDRs:     []netip.Prefix{podCIDR4, podCIDR6},
		NonMasqCIDRs: []netip.Prefix{podCIDR4, podCIDR6, svcCIDR4, svcCIDR6},
	}
	rs1 := mustRules(t, dual)
	if err := m.Apply(rs1); err != nil {
		t.Fatal(err)
	}
	if n := gens.since(t); n != 1 {
		t.Errorf("first Apply committed %d transactions, want 1", n)
	}
	checkInstalled(t, ns, m, rs1)

	if err := m.Apply(rs1); err != nil {
		t.Fatal(err)
	}
	if n := gens.since(t); n != 0 {
		t.Errorf("Apply of the installed ruleset committed %d transactions, want 0", n)
	}

	changed := dual
	changed.NonMasqCIDRs = append(changed.NonMasqCIDRs, pfx("192.168.0.0/16"), pfx("10.0.0.0/8"), pfx("240.0.0.0/4"), pfx("fd00::/8"))
	changed.MasqPortRange = PortRange{40000, 49999}
	rs2 := mustRules(t, changed)
	if err := m.Apply(rs2); err != nil {
		t.Fatal(err)
	}
	if n := gens.since(t); n != 1 {
		t.Errorf("Apply of changed CIDRs committed %d transactions, want 1", n)
	}
	checkInstalled(t, ns, m, rs2)
	if rs1.RuleCount() != rs2.RuleCount() {
		t.Errorf("rule count changed with the CIDRs: %d -> %d", rs1.RuleCount(), rs2.RuleCount())
	}

	// Someone edits kpr's table: the next Apply puts it back.
	ns.run(t, "nft", "add rule ip kpr postrouting counter; add chain ip6 kpr extra; flush set ip kpr pod-cidrs")
	if cur, err := m.Current(); err != nil || cur.Equal(rs2) {
		t.Fatalf("edited table reads back as the desired one (err %v)", err)
	}
	_ = gens.since(t) // the edit itself
	if err := m.Apply(rs2); err != nil {
		t.Fatal(err)
	}
	if n := gens.since(t); n != 1 {
		t.Errorf("repairing Apply committed %d transactions, want 1", n)
	}
	checkInstalled(t, ns, m, rs2)

	// IPv4 only now: the ip6 table goes, in the same single transaction.
	v4 := Config{PodCIDRs: []netip.Prefix{podCIDR4}, NonMasqCIDRs: []netip.Prefix{podCIDR4, svcCIDR4}}
	rs3 := mustRules(t, v4)
	if err := m.Apply(rs3); err != nil {
		t.Fatal(err)
	}
	if n := gens.since(t); n != 1 {
		t.Errorf("Apply to IPv4 only committed %d transactions, want 1", n)
	}
	checkInstalled(t, ns, m, rs3)

	if got := foreign(); got != foreignBefore {
		t.Errorf("Apply changed other tables:\nbefore:\n%s\nafter:\n%s", foreignBefore, got)
	}

	if err := m.Delete(); err != nil {
		t.Fatal(err)
	}
	if n := gens.since(t); n != 1 {
		t.Errorf("Delete committed %d transactions, want 1", n)
	}
	checkInstalled(t, ns, m, Ruleset{})
	if err := m.Delete(); err != nil {
		t.Errorf("Delete without tables: %v", err)
	}
	if n := gens.since(t); n != 0 {
		t.Errorf("Delete without tables committed %d transactions, want 0", n)
	}
	if got := foreign(); got != foreignBefore {
		t.Errorf("Delete changed other tables:\nbefore:\n%s\nafter:\n%s", foreignBefore, got)
	}
	t.Logf("nft list ruleset after Delete (foreign tables only):\n%s", ns.run(t, "nft", "list", "ruleset"))
}

// A transaction the kernel rejects changes nothing: the table stays as it was.
func TestKernelRejectedApplyChangesNothing(t *testing.T) {
	requirePrivileged(t)
	ns := newNetns(t, "reject")
	m := NewManager(ns.conn(t), "")
	rs := mustRules(t, Config{PodCIDRs: []netip.Prefix{podCIDR4}, NonMasqCIDRs: []netip.Prefix{podCIDR4, svcCIDR4}})
	if err := m.Apply(rs); err != nil {
		t.Fatal(err)
	}
	gens := watchGenerations(t, ns)

	bad := mustRules(t, Config{PodCIDRs: []netip.Prefix{podCIDR4, podCIDR6}, NonMasqCIDRs: []netip.Prefix{podCIDR4, podCIDR6}})
	// The ip6 table is fine; the ip table's jump goes nowhere, which only
	// the kernel notices, late in the batch.
	bad.Tables[0].Chains[0].Rules[0].Jump = "no-such-chain"
	err := m.Apply(bad)
	if err == nil {
		t.Fatal("Apply with a jump to a missing chain succeeded")
	}
	t.Logf("Apply error: %v", err)
	if n := gens.since(t); n != 0 {
		t.Errorf("rejected Apply committed %d transactions", n)
	}
	checkInstalled(t, ns, m, rs)
}

// What nft builds from Ruleset.String is what Manager writes, as nft itself
// lists them; and Current understands nft's encoding.
func TestKernelMatchesNft(t *testing.T) {
	requirePrivileged(t)
	for name, cfg := range map[string]Config{
		"dual-stack": {
			PodCIDRs:     []netip.Prefix{podCIDR4, podCIDR6},
			NonMasqCIDRs: []netip.Prefix{podCIDR4, podCIDR6, svcCIDR4, svcCIDR6},
		},
		"ranges from zero and to the top": {
			PodCIDRs: []netip.Prefix{pfx("10.244.0.0/16"), pfx("fd6b:7072:244::/56")},
			NonMasqCIDRs: []netip.Prefix{pfx("0.0.0.0/8"), pfx("10.0.0.0/8"), pfx("11.0.0.0/8"), pfx("12.0.0.0/8"), pfx("224.0.0.0/3"),
				pfx("::/8"), pfx("fd6b:7072:244::/56"), pfx("ff00::/8")},
			MasqPortRange: PortRange{1024, 1024},
		},
	} {
		t.Run(name, func(t *testing.T) {
			rs := mustRules(t, cfg)
			ours, theirs := newNetns(t, "ours"), newNetns(t, "nft")
			m := NewManager(ours.conn(t), "")
			if err := m.Apply(rs); err != nil {
				t.Fatal(err)
			}
			theirs.nft(t, rs.String())
			t.Logf("nft list ruleset after Apply:\n%s", ours.run(t, "nft", "list", "ruleset"))
			got, want := canonical(t, ours.listJSON(t)), canonical(t, theirs.listJSON(t))
			if got == "" {
				t.Fatal("nft lists nothing")
			}
			if got != want {
				t.Errorf("nft -j list ruleset after Apply:\n%s\nafter nft -f of Ruleset.String:\n%s", got, want)
			}
			// The expressions as the kernel holds them (the JSON above does not
			// show every flag).
			gotRaw := ours.run(t, "nft", "--debug=netlink", "list", "ruleset")
			wantRaw := theirs.run(t, "nft", "--debug=netlink", "list", "ruleset")
			if gotRaw != wantRaw {
				t.Errorf("nft --debug=netlink list ruleset after Apply:\n%s\nafter nft -f:\n%s", gotRaw, wantRaw)
			}
			cur, err := NewManager(theirs.conn(t), "").Current()
			if err != nil {
				t.Fatal(err)
			}
			if !cur.Equal(rs) {
				t.Errorf("Current of nft's tables:\n%s\nwant:\n%s", cur, rs)
			}
		})
	}
}

// The kernel-side twin of TestRuleCountIndependentOfServices: the table for
// 10,000 Services is the table for 1, so applying it changes nothing.
func TestKernelRuleCountIndependentOfServices(t *testing.T) {
	requirePrivileged(t)
	ns := newNetns(t, "svc")
	m := NewManager(ns.conn(t), "")
	gens := watchGenerations(t, ns)
	ruleCount := func() int {
		n := 0
		for _, o := range ns.listJSON(t) {
			if kind, _, _ := o.describe(); kind == "rule" && o.isKpr(DefaultTableName) {
				n++
			}
		}
		return n
	}
	if err := m.Apply(mustRules(t, configForServices(t, makeServices(1)))); err != nil {
		t.Fatal(err)
	}
	one := ruleCount()
	if n := gens.since(t); n != 1 {
		t.Errorf("Apply for 1 Service committed %d transactions, want 1", n)
	}
	if err := m.Apply(mustRules(t, configForServices(t, makeServices(10_000)))); err != nil {
		t.Fatal(err)
	}
	if n := gens.since(t); n != 0 {
		t.Errorf("Apply for 10,000 Services committed %d transactions, want 0 (nothing to change)", n)
	}
	if many := ruleCount(); one != 10 || many != one {
		t.Errorf("nft lists %d rules for 1 Service and %d for 10,000, want 10 for both", one, many)
	}
}

func TestKernelTableName(t *testing.T) {
	requirePrivileged(t)
	ns := newNetns(t, "name")
	cfg := Config{PodCIDRs: []netip.Prefix{podCIDR4}, NonMasqCIDRs: []netip.Prefix{podCIDR4}, TableName: "kpr-other"}
	other := NewManager(ns.conn(t), "kpr-other")
	def := NewManager(ns.conn(t), "")
	if err := other.Apply(mustRules(t, cfg)); err != nil {
		t.Fatal(err)
	}
	cfg.TableName = ""
	if err := other.Apply(mustRules(t, cfg)); err == nil {
		t.Error("a manager of table kpr-other applied a table named kpr")
	}
	if err := def.Apply(mustRules(t, cfg)); err != nil {
		t.Fatal(err)
	}
	if err := def.Delete(); err != nil {
		t.Fatal(err)
	}
	cur, err := other.Current()
	if err != nil || len(cur.Tables) != 1 || cur.Tables[0].Name != "kpr-other" {
		t.Errorf("deleting table kpr touched kpr-other: %v %v", cur, err)
	}
}
