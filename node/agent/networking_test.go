package agent

import (
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/kpr-dev/kpr/kubeadm"
	"github.com/kpr-dev/kpr/node/config"
)

// discover runs kubeadm.Discover on a kubeadm file with the given content ("" for none), as
// the agent does, without credentials.
func discover(t *testing.T, content string) (*config.Config, *kubeadm.Cluster) {
	t.Helper()
	dir := t.TempDir()
	cfg := &config.Config{KubeletKubeconfig: filepath.Join(dir, "missing-kubelet.conf"), APIServers: []string{"198.18.0.1:6443"}}
	if content != "" {
		cfg.KubeadmConfig = filepath.Join(dir, "kubeadm.yaml")
		if err := os.WriteFile(cfg.KubeadmConfig, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	c, err := kubeadm.Discover(kubeadm.Options{KubeadmConfig: cfg.KubeadmConfig, KubeletConf: cfg.KubeletKubeconfig, APIServers: cfg.APIServers})
	if err != nil {
		t.Fatal(err)
	}
	return cfg, c
}

func prefixes(ss ...string) []netip.Prefix {
	out := make([]netip.Prefix, len(ss))
	for i, s := range ss {
		out[i] = netip.MustParsePrefix(s)
	}
	return out
}

func wantFrom(t *testing.T, what, got string, parts ...string) {
	t.Helper()
	for _, p := range parts {
		if !strings.Contains(got, p) {
			t.Errorf("%s from %q, want it to mention %q", what, got, p)
		}
	}
}

func TestEffectiveNetworking(t *testing.T) {
	const dualStack = `apiVersion: kubeadm.k8s.io/v1beta4
kind: ClusterConfiguration
networking:
  dnsDomain: example.internal
  serviceSubnet: 10.96.0.0/16,fd6b:7072:96::/112
  podSubnet: 10.244.0.0/16,fd6b:7072:244::/56
`
	t.Run("kubeadm", func(t *testing.T) {
		cfg, c := discover(t, dualStack)
		n, err := effectiveNetworking(cfg, c)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(n.serviceCIDRs, prefixes("10.96.0.0/16", "fd6b:7072:96::/112")) ||
			!slices.Equal(n.podCIDRs, prefixes("10.244.0.0/16", "fd6b:7072:244::/56")) || n.dnsDomain != "example.internal" {
			t.Fatalf("%+v", n)
		}
		wantFrom(t, "service CIDRs", n.serviceCIDRsFrom, cfg.KubeadmConfig, "networking.serviceSubnet")
		wantFrom(t, "pod CIDRs", n.podCIDRsFrom, cfg.KubeadmConfig, "networking.podSubnet")
		wantFrom(t, "DNS domain", n.dnsDomainFrom, cfg.KubeadmConfig, "networking.dnsDomain")
		st := n.status()
		if !slices.Equal(st.ServiceCIDRs, []string{"10.96.0.0/16", "fd6b:7072:96::/112"}) || st.DNSDomain != "example.internal" {
			t.Fatalf("status %+v", st)
		}
	})

	t.Run("config wins, masked", func(t *testing.T) {
		cfg, c := discover(t, dualStack)
		cfg.ServiceCIDRs = []string{" 10.100.0.1/16", "fd00:96::/108"}
		cfg.ClusterCIDR = []string{"10.200.0.0/16"}
		n, err := effectiveNetworking(cfg, c)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(n.serviceCIDRs, prefixes("10.100.0.0/16", "fd00:96::/108")) || !slices.Equal(n.podCIDRs, prefixes("10.200.0.0/16")) {
			t.Fatalf("%+v", n)
		}
		wantFrom(t, "service CIDRs", n.serviceCIDRsFrom, "config serviceCIDRs")
		wantFrom(t, "pod CIDRs", n.podCIDRsFrom, "config clusterCIDR")
		cfg.ServiceCIDRs = []string{"not-a-cidr"}
		if _, err := effectiveNetworking(cfg, c); err == nil || !strings.Contains(err.Error(), "serviceCIDRs") {
			t.Fatalf("bad serviceCIDRs: %v", err)
		}
	})

	t.Run("kubeadm defaults", func(t *testing.T) {
		cfg, c := discover(t, "apiVersion: kubeadm.k8s.io/v1beta4\nkind: ClusterConfiguration\n")
		n, err := effectiveNetworking(cfg, c)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(n.serviceCIDRs, prefixes("10.96.0.0/12")) || len(n.podCIDRs) != 0 || n.dnsDomain != "cluster.local" {
			t.Fatalf("%+v", n)
		}
		wantFrom(t, "service CIDRs", n.serviceCIDRsFrom, "kubeadm default")
		wantFrom(t, "pod CIDRs", n.podCIDRsFrom, "none", "clusterCIDR", "podSubnet not set")
	})

	t.Run("joining worker", func(t *testing.T) {
		cfg, c := discover(t, `apiVersion: kubeadm.k8s.io/v1beta4
kind: JoinConfiguration
discovery:
  bootstrapToken:
    apiServerEndpoint: "198.18.0.1:6443"
    token: "abcdef.0123456789abcdef"
    unsafeSkipCAVerification: true
`)
		n, err := effectiveNetworking(cfg, c)
		if err != nil {
			t.Fatal(err)
		}
		if len(n.serviceCIDRs) != 0 || len(n.podCIDRs) != 0 || n.dnsDomain != "" {
			t.Fatalf("%+v", n)
		}
		wantFrom(t, "service CIDRs", n.serviceCIDRsFrom, "none", "serviceCIDRs", "has no ClusterConfiguration")
		wantFrom(t, "DNS domain", n.dnsDomainFrom, "unknown", "has no ClusterConfiguration")
	})

	t.Run("no kubeadm file", func(t *testing.T) {
		cfg, c := discover(t, "")
		n, err := effectiveNetworking(cfg, c)
		if err != nil {
			t.Fatal(err)
		}
		if len(n.serviceCIDRs) != 0 {
			t.Fatalf("%+v", n)
		}
		wantFrom(t, "service CIDRs", n.serviceCIDRsFrom, "none", "serviceCIDRs", "no kubeadmConfig")
	})
}
