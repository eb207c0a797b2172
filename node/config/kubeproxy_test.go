package config

import (
	"os"
	"strings"
	"testing"
)

// settings of an import as key: YAML value.
func imported(im *Import) map[string]string {
	out := map[string]string{}
	for _, s := range im.Settings {
		out[s.Key] = yamlValue(s.Value)
	}
	return out
}

// The KubeProxyConfiguration the pinned kubeadm writes (kubeadm/testdata/kubeadm-print):
// iptables mode with every field at its default. The only thing to carry over is its
// NodePort addresses (every address, as kube-proxy's iptables mode); the in-pod kubeconfig is
// reported, not copied.
func TestImportKubeadmDefaults(t *testing.T) {
	data, err := os.ReadFile("../../kubeadm/testdata/kubeadm-print/init-defaults-component-configs.yaml")
	if err != nil {
		t.Fatal(err)
	}
	im, err := ImportKubeProxy(data)
	if err != nil {
		t.Fatal(err)
	}
	if got := imported(im); len(got) != 1 || got["nodePortAddresses"] != `["all"]` {
		t.Errorf("settings %v, want only nodePortAddresses [all]", got)
	}
	joined := strings.Join(im.Unmatched, "\n")
	if !strings.Contains(joined, "mode (iptables)") || !strings.Contains(joined, kubeadmProxyKubeconfig) || len(im.Unmatched) != 2 {
		t.Errorf("unmatched:\n%s\nwant the mode and the in-pod kubeconfig only", joined)
	}
	// The result is a valid kpr configuration.
	if _, err := load(t, nil, nil, im.YAML("kubeadm")); err != nil {
		t.Errorf("the converted file does not load: %v\n%s", err, im.YAML("kubeadm"))
	}
}

const customKubeProxy = `apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
hostnameOverride: worker-3
clusterCIDR: 10.244.0.0/16,fd00:10:244::/56
nodePortAddresses: [192.168.0.0/16, "fd00:1::/64"]
healthzBindAddress: 127.0.0.1
metricsBindAddress: 0.0.0.0:10249
nftables:
  syncPeriod: 45s
  minSyncPeriod: 2s
  masqueradeAll: true
iptables:
  syncPeriod: 10s
conntrack:
  maxPerCore: 65536
  tcpEstablishedTimeout: 2h
featureGates:
  SomeGate: true
oomScoreAdj: -500
`

// Every kube-proxy knob kpr shares keeps its meaning; the rest is listed with its value.
func TestImportCustom(t *testing.T) {
	im, err := ImportKubeProxy([]byte(customKubeProxy))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		"nodeName":           `"worker-3"`,
		"clusterCIDR":        `["10.244.0.0/16", "fd00:10:244::/56"]`,
		"nodePortAddresses":  `["192.168.0.0/16", "fd00:1::/64"]`,
		"healthzBindAddress": `"127.0.0.1:10256"`,
		"syncPeriod":         `"45s"`, // the nftables section: the mode in use
		"minSyncPeriod":      `"2s"`,
		"metricsBindAddress": `"0.0.0.0:10249"`,
	}
	got := imported(im)
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s: %s, want %s", k, got[k], v)
		}
	}
	if len(got) != len(want) {
		t.Errorf("settings %v, want exactly %v", got, want)
	}
	joined := strings.Join(im.Unmatched, "\n")
	for _, field := range []string{"mode (nftables)", "masqueradeAll", "conntrack", "featureGates (SomeGate=true)", "oomScoreAdj (-500)"} {
		if !strings.Contains(joined, field) {
			t.Errorf("unmatched does not list %s:\n%s", field, joined)
		}
	}
	c, err := load(t, nil, nil, im.YAML("custom"))
	if err != nil {
		t.Fatalf("the converted file does not load: %v\n%s", err, im.YAML("custom"))
	}
	if c.NodeName != "worker-3" || c.SyncPeriod.String() != "45s" || len(c.ClusterCIDR) != 2 || c.HealthzBindAddress != "127.0.0.1:10256" {
		t.Errorf("loaded: %+v", c)
	}
}

// kubeadm keeps kube-proxy's configuration in the kube-system/kube-proxy ConfigMap, as
// data.config.conf beside the in-pod kubeconfig.
func TestImportConfigMap(t *testing.T) {
	var cm strings.Builder
	cm.WriteString("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: kube-proxy\n  namespace: kube-system\ndata:\n  config.conf: |-\n")
	for _, line := range strings.Split(strings.TrimSpace(customKubeProxy), "\n") {
		cm.WriteString("    " + line + "\n")
	}
	cm.WriteString("  kubeconfig.conf: |-\n    apiVersion: v1\n    kind: Config\n")
	im, err := ImportKubeProxy([]byte(cm.String()))
	if err != nil {
		t.Fatal(err)
	}
	if imported(im)["nodeName"] != `"worker-3"` {
		t.Errorf("from the ConfigMap: %v", imported(im))
	}
}

func TestImportErrors(t *testing.T) {
	for name, tc := range map[string]struct{ data, want string }{
		"unknown field":  {"apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nnodePortAdresses: [all]\n", `unknown field "nodePortAdresses"`},
		"other kind":     {"apiVersion: v1\nkind: Pod\n", "no KubeProxyConfiguration (or kube-proxy ConfigMap) among Pod"},
		"other version":  {"apiVersion: kubeproxy.config.k8s.io/v2\nkind: KubeProxyConfiguration\n", `apiVersion "kubeproxy.config.k8s.io/v2"`},
		"no config.conf": {"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: kp, namespace: kube-system}\ndata: {}\n", "kube-system/kp has no data.config.conf"},
		"empty":          {"", "no KubeProxyConfiguration"},
	} {
		if _, err := ImportKubeProxy([]byte(tc.data)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error with %q", name, err, tc.want)
		}
	}
}
