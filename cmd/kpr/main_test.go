package main

import (
	"bytes"
	"net/netip"
	"os"
	"strings"
	"testing"

	v1 "k8s.io/api/core/v1"

	"github.com/kpr-dev/kpr/bpf"
	"github.com/kpr-dev/kpr/node/agent"
	"github.com/kpr-dev/kpr/node/datapath"
	"github.com/kpr-dev/kpr/node/lbstate"
)

func TestServiceListShowsWhatIsProgrammed(t *testing.T) {
	m := datapath.NewFake()
	r, err := datapath.NewReconciler(m)
	if err != nil {
		t.Fatal(err)
	}
	web := lbstate.Frontend{
		FrontendKey: lbstate.FrontendKey{Addr: netip.MustParseAddr("10.96.0.10"), Port: 80, Protocol: v1.ProtocolTCP},
		Type:        lbstate.ClusterIP,
		Backends:    []netip.AddrPort{netip.MustParseAddrPort("10.244.1.3:8080"), netip.MustParseAddrPort("10.244.1.2:8080")},
	}
	empty := lbstate.Frontend{
		FrontendKey: lbstate.FrontendKey{Addr: netip.MustParseAddr("fd6b:7072:96::a"), Port: 53, Protocol: v1.ProtocolUDP},
		Type:        lbstate.ClusterIP,
	}
	local := lbstate.Frontend{
		FrontendKey: lbstate.FrontendKey{Addr: netip.MustParseAddr("10.96.0.11"), Port: 80, Protocol: v1.ProtocolTCP},
		Type:        lbstate.ClusterIP,
		NoBackends:  lbstate.Unreachable,
	}
	r.Set("default/web", []lbstate.Frontend{web})
	r.Set("default/empty", []lbstate.Frontend{empty})
	r.Set("default/local", []lbstate.Frontend{local})
	if _, err := r.Sync(nil); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if err := listServices(&out, m); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	want := [][]string{
		{"ID", "Frontend", "Type", "Scope", "Backends"},
		{"10.96.0.10:80/tcp", "ClusterIP", "socket", "=> 10.244.1.2:8080/tcp"},
		{"=> 10.244.1.3:8080/tcp"},
		{"10.96.0.11:80/tcp", "ClusterIP", "socket", "none: unreachable (no local endpoints)"},
		{"[fd6b:7072:96::a]:53/udp", "ClusterIP", "socket", "none: refused (no endpoints)"},
	}
	if len(lines) != len(want) {
		t.Fatalf("got %d lines, want %d:\n%s", len(lines), len(want), out.String())
	}
	for i, parts := range want {
		for _, p := range parts {
			if !strings.Contains(lines[i], p) {
				t.Fatalf("line %d %q lacks %q:\n%s", i, lines[i], p, out.String())
			}
		}
	}
	if strings.Contains(out.String(), "any port") {
		t.Fatalf("wildcard entries must not be listed:\n%s", out.String())
	}
}

func TestNetworkingLine(t *testing.T) {
	got := networkingLine(&agent.Networking{
		ServiceCIDRs:     []string{"10.96.0.0/16", "fd6b:7072:96::/112"},
		ServiceCIDRsFrom: "/etc/kubernetes/kubeadm.yaml ClusterConfiguration.networking.serviceSubnet",
		PodCIDRs:         []string{},
		PodCIDRsFrom:     "none: clusterCIDR not set in kpr's config and no kubeadmConfig is given",
		DNSDomain:        "cluster.local",
		DNSDomainFrom:    "kubeadm default",
	})
	want := "service CIDRs 10.96.0.0/16,fd6b:7072:96::/112 (/etc/kubernetes/kubeadm.yaml ClusterConfiguration.networking.serviceSubnet); " +
		"pod CIDRs none: clusterCIDR not set in kpr's config and no kubeadmConfig is given; DNS domain cluster.local (kubeadm default)"
	if got != want {
		t.Fatalf("networkingLine =\n%s\nwant\n%s", got, want)
	}
	if got := networkingLine(&agent.Networking{DNSDomainFrom: "unknown: no kubeadmConfig is given"}); !strings.HasSuffix(got, "DNS domain unknown: no kubeadmConfig is given") {
		t.Fatalf("unknown DNS domain: %s", got)
	}
}

func TestNorthSouthCounters(t *testing.T) {
	got := northSouthCounters(bpf.NodePortStats{NewFlows: 3, Forwarded: 10, Replies: 9, Rejected: 2, EchoReplies: 1, DropSourceRange: 4, RateLimited: 5})
	want := "3 flows, 10 packets forwarded, 9 replies; answered: 2 refusals, 1 pings, 0 too big, 0 TTL exceeded, 0 ICMP errors passed on; dropped: 4 outside loadBalancerSourceRanges, 5 over the answer rate limit"
	if got != want {
		t.Errorf("got  %q\nwant %q", got, want)
	}
	got = northSouthCounters(bpf.NodePortStats{NewFlows: 1, Forwarded: 5, XDPTx: 4, DSRLearned: 7, DropDSRNoRoom: 1})
	want = "1 flows, 5 packets forwarded, 0 replies (4 of these by XDP); answered: 0 refusals, 0 pings, 0 too big, 0 TTL exceeded, 0 ICMP errors passed on; 7 DSR packets from other nodes told where replies go; dropped: 1 no room for the DSR option"
	if got != want {
		t.Errorf("got  %q\nwant %q", got, want)
	}
	if got := northSouthCounters(bpf.NodePortStats{}); strings.Contains(got, "dropped") || strings.Contains(got, "DSR") {
		t.Errorf("no drops, yet %q", got)
	}
}

// kpr config validate: the printed defaults are valid; a bad file fails with every problem,
// each naming its key.
func TestConfigValidate(t *testing.T) {
	dir := t.TempDir()
	run := func(args ...string) (string, error) {
		var out bytes.Buffer
		c := configCmd(&out)
		c.SetArgs(args)
		c.SetOut(&out)
		c.SetErr(&out)
		err := c.Execute()
		return out.String(), err
	}
	defaults, err := run("defaults")
	if err != nil || !strings.Contains(defaults, "# loadBalancerMode: \"snat\"") {
		t.Fatalf("config defaults: %v\n%s", err, defaults)
	}
	good, bad := dir+"/good.yaml", dir+"/bad.yaml"
	if err := os.WriteFile(good, []byte(defaults+"nodeName: n1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := run("validate", good); err != nil || !strings.Contains(out, good+": valid") {
		t.Fatalf("validate of the defaults: %v\n%s", err, out)
	}
	if err := os.WriteFile(bad, []byte("bpfPinDri: /x\nacceleration: fast\nmaglevTableSize: 100\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err = run("validate", bad)
	for _, want := range []string{bad + " is not valid", `"bpfpindri"`, "acceleration:", "maglevTableSize:"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("validate of a bad file: %v; want it to name %q", err, want)
		}
	}
}

// kpr config import-kube-proxy prints a kpr configuration that kpr config validate accepts,
// and lists what it could not carry over on stderr.
func TestConfigImportKubeProxy(t *testing.T) {
	var out, errOut bytes.Buffer
	c := configCmd(&out)
	c.SetArgs([]string{"import-kube-proxy", "../../kubeadm/testdata/kubeadm-print/init-defaults-component-configs.yaml"})
	c.SetErr(&errOut)
	if err := c.Execute(); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), `nodePortAddresses: ["all"]`) || !strings.Contains(errOut.String(), "without an equivalent in kpr") {
		t.Fatalf("stdout:\n%s\nstderr:\n%s", out.String(), errOut.String())
	}
	file := t.TempDir() + "/kpr.yaml"
	if err := os.WriteFile(file, out.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	var vout bytes.Buffer
	v := configCmd(&vout)
	v.SetArgs([]string{"validate", file})
	if err := v.Execute(); err != nil {
		t.Fatalf("validate of the imported file: %v", err)
	}
}

// kpr kubeadm init-config -w changes the file in place, once.
func TestKubeadmInitConfigWrite(t *testing.T) {
	data, err := os.ReadFile("../../kubeadm/testdata/kubeadm-print/init-defaults.yaml")
	if err != nil {
		t.Fatal(err)
	}
	file := t.TempDir() + "/kubeadm.yaml"
	if err := os.WriteFile(file, data, 0o600); err != nil {
		t.Fatal(err)
	}
	for i, want := range []string{"changed: kubeadm.yaml: ClusterConfiguration", "already keeps kubeadm init from installing kube-proxy"} {
		var out, errOut bytes.Buffer
		c := kubeadmCmd(&out)
		c.SetArgs([]string{"init-config", "-w", file})
		c.SetErr(&errOut)
		if err := c.Execute(); err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(errOut.String(), want) || out.Len() != 0 {
			t.Errorf("run %d: stderr %q, stdout %q; want %q on stderr only", i+1, errOut.String(), out.String(), want)
		}
	}
	got, _ := os.ReadFile(file)
	if !strings.Contains(string(got), "proxy:\n  disabled: true") {
		t.Errorf("the file was not changed:\n%s", got)
	}
	if st, _ := os.Stat(file); st.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, want the file's own 0600", st.Mode().Perm())
	}
}
