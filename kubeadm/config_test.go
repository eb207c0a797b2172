package kubeadm

import (
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

const kubeletServer = "https://198.18.0.100:6443"

func prefixes(t *testing.T, s ...string) []netip.Prefix {
	t.Helper()
	var out []netip.Prefix
	for _, p := range s {
		out = append(out, netip.MustParsePrefix(p))
	}
	return out
}

// TestDiscoverKubeadmConfig decodes kubeadm's own output and documented v1beta3/v1beta4
// examples next to a kubelet.conf, and checks what a user sees: endpoints in failover order,
// subnets, DNS domain, and where each came from.
func TestDiscoverKubeadmConfig(t *testing.T) {
	pki := newTestPKI(t, "cp1")
	kubeletDir := t.TempDir()
	kubeletPath := writeKubeconfig(t, kubeletDir, pki.embedded(kubeletServer))

	tests := []struct {
		file        string
		endpoints   []string
		services    []string
		pods        []string
		dnsDomain   string
		sources     []string // substrings, each must appear in some Sources line
		noSourceHas []string // substrings no Sources line may contain
	}{
		{
			file:      "kubeadm-print/init-defaults.yaml",
			endpoints: []string{"https://1.2.3.4:6443", kubeletServer},
			services:  []string{"10.96.0.0/12"},
			dnsDomain: "cluster.local",
			sources: []string{
				"endpoint https://1.2.3.4:6443 from testdata/kubeadm-print/init-defaults.yaml InitConfiguration.localAPIEndpoint",
				"serviceSubnet 10.96.0.0/12 from testdata/kubeadm-print/init-defaults.yaml ClusterConfiguration.networking.serviceSubnet",
				"1.2.3.4 is the placeholder printed by `kubeadm config print init-defaults`",
				"podSubnet unknown",
			},
		},
		{
			file:      "kubeadm-print/init-defaults-component-configs.yaml",
			endpoints: []string{"https://1.2.3.4:6443", kubeletServer},
			services:  []string{"10.96.0.0/12"},
			dnsDomain: "cluster.local",
			sources: []string{
				"ignored KubeletConfiguration (kubelet.config.k8s.io/v1beta1)",
				"ignored KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1)",
			},
		},
		{
			file:      "kubeadm-print/join-defaults.yaml",
			endpoints: []string{"https://kube-apiserver:6443", kubeletServer},
			sources: []string{
				"JoinConfiguration.discovery.bootstrapToken.apiServerEndpoint",
				"service and pod subnets unknown",
			},
		},
		{
			file:      "examples/v1beta4-init-dualstack.yaml",
			endpoints: []string{"https://cp.kpr.test:7443", kubeletServer},
			services:  []string{"10.96.0.0/16", "fd6b:7072:96::/112"},
			pods:      []string{"10.244.0.0/16", "fd6b:7072:244::/56"},
			dnsDomain: "kpr.test",
			sources: []string{
				"ClusterConfiguration.controlPlaneEndpoint (port 7443 from InitConfiguration.localAPIEndpoint.bindPort)",
				"endpoint https://198.18.0.1:7443 from testdata/examples/v1beta4-init-dualstack.yaml InitConfiguration.localAPIEndpoint not used",
				"dnsDomain kpr.test from testdata/examples/v1beta4-init-dualstack.yaml ClusterConfiguration.networking.dnsDomain",
				"ignored KubeletConfiguration",
				"ignored KubeProxyConfiguration",
			},
			noSourceHas: []string{"kubeadm default"},
		},
		{
			file:      "examples/v1beta4-init-ipv6.yaml",
			endpoints: []string{"https://[fd6b:7072::1]:6443", kubeletServer},
			services:  []string{"fd6b:7072:96::/112", "10.96.0.0/16"},
			pods:      []string{"fd6b:7072:244::/56", "10.244.0.0/16"},
			dnsDomain: "cluster.local",
			sources: []string{
				"InitConfiguration.localAPIEndpoint (port 6443 is kubeadm's default bindPort)",
				"dnsDomain cluster.local from kubeadm default (ClusterConfiguration.networking.dnsDomain not set in testdata/examples/v1beta4-init-ipv6.yaml)",
			},
		},
		{
			file:      "examples/v1beta4-join-controlplane.yaml",
			endpoints: []string{"https://198.18.0.2:6443", kubeletServer},
			sources: []string{
				"endpoint https://198.18.0.2:6443 from testdata/examples/v1beta4-join-controlplane.yaml JoinConfiguration.controlPlane.localAPIEndpoint",
				"endpoint https://198.18.0.1:6443 from testdata/examples/v1beta4-join-controlplane.yaml JoinConfiguration.discovery.bootstrapToken.apiServerEndpoint not used",
			},
		},
		{
			file:      "examples/v1beta4-join-worker-ipv6.yaml",
			endpoints: []string{"https://[fd6b:7072::1]:6443", kubeletServer},
			sources:   []string{"service and pod subnets unknown"},
		},
		{
			file:      "examples/v1beta4-cluster-only.yaml",
			endpoints: []string{kubeletServer},
			services:  []string{"10.96.0.0/12"},
			pods:      []string{"10.244.0.0/16"},
			dnsDomain: "cluster.local",
			sources: []string{
				"serviceSubnet 10.96.0.0/12 from kubeadm default (ClusterConfiguration.networking.serviceSubnet not set in testdata/examples/v1beta4-cluster-only.yaml)",
				"podSubnet 10.244.0.0/16 from testdata/examples/v1beta4-cluster-only.yaml ClusterConfiguration.networking.podSubnet",
				"no API server endpoint in testdata/examples/v1beta4-cluster-only.yaml",
			},
		},
		{
			file:      "examples/v1beta4-init-no-advertise.yaml",
			endpoints: []string{kubeletServer},
			services:  []string{"10.96.0.0/12"},
			dnsDomain: "cluster.local",
			sources: []string{
				"InitConfiguration.localAPIEndpoint.advertiseAddress is empty",
				"serviceSubnet 10.96.0.0/12 from kubeadm default (testdata/examples/v1beta4-init-no-advertise.yaml has an InitConfiguration but no ClusterConfiguration)",
			},
		},
		{
			file:      "examples/v1beta3-init.yaml",
			endpoints: []string{"https://[fd6b:7072::100]:6443", kubeletServer},
			services:  []string{"10.96.0.0/16"},
			pods:      []string{"10.244.0.0/16"},
			dnsDomain: "cluster.local",
			sources: []string{
				"endpoint https://[fd6b:7072::100]:6443 from testdata/examples/v1beta3-init.yaml ClusterConfiguration.controlPlaneEndpoint",
				"dnsDomain cluster.local from kubeadm default",
			},
		},
		{
			file:      "examples/v1beta3-join-worker.yaml",
			endpoints: []string{"https://cp.kpr.test:6443", kubeletServer},
		},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			c, err := Discover(Options{KubeadmConfig: filepath.Join("testdata", tt.file), KubeletConf: kubeletPath})
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(c.Endpoints, tt.endpoints) {
				t.Errorf("Endpoints = %q, want %q", c.Endpoints, tt.endpoints)
			}
			if want := prefixes(t, tt.services...); !slices.Equal(c.ServiceSubnets, want) {
				t.Errorf("ServiceSubnets = %v, want %v", c.ServiceSubnets, want)
			}
			if want := prefixes(t, tt.pods...); !slices.Equal(c.PodSubnets, want) {
				t.Errorf("PodSubnets = %v, want %v", c.PodSubnets, want)
			}
			if c.DNSDomain != tt.dnsDomain {
				t.Errorf("DNSDomain = %q, want %q", c.DNSDomain, tt.dnsDomain)
			}
			if c.RESTConfig == nil || c.RESTConfig.Host != tt.endpoints[0] {
				t.Errorf("RESTConfig = %+v, want Host %s", c.RESTConfig, tt.endpoints[0])
			}
			checkSources(t, c.Sources, tt.sources, tt.noSourceHas)
		})
	}
}

func checkSources(t *testing.T, sources, want, notWant []string) {
	t.Helper()
	for _, w := range want {
		if !slices.ContainsFunc(sources, func(s string) bool { return strings.Contains(s, w) }) {
			t.Errorf("no Sources line contains %q; Sources:\n  %s", w, strings.Join(sources, "\n  "))
		}
	}
	for _, w := range notWant {
		if slices.ContainsFunc(sources, func(s string) bool { return strings.Contains(s, w) }) {
			t.Errorf("a Sources line contains %q; Sources:\n  %s", w, strings.Join(sources, "\n  "))
		}
	}
}

// TestDiscoverMalformedConfig checks that a broken kubeadm config is an error naming the file
// and the field, never a silently wrong cluster.
func TestDiscoverMalformedConfig(t *testing.T) {
	pki := newTestPKI(t, "cp1")
	kubeletPath := writeKubeconfig(t, t.TempDir(), pki.embedded(kubeletServer))

	tests := []struct {
		file string
		want string // the error must start with "testdata/bad/<file>: " and contain this
	}{
		{"service-subnet-not-cidr.yaml", `ClusterConfiguration networking.serviceSubnet: "10.96.0.0/33" is not a CIDR`},
		{"pod-subnet-same-family.yaml", `ClusterConfiguration networking.podSubnet: "10.244.0.0/16,10.245.0.0/16": dual-stack needs one IPv4 and one IPv6 CIDR`},
		{"unknown-field.yaml", `ClusterConfiguration at line 6: strict decoding error: unknown field "networking.serviceSubnett"`},
		{"v1beta3-field-in-v1beta4.yaml", `unknown field "apiServer.timeoutForControlPlane"`},
		{"wrong-type.yaml", `localAPIEndpoint.bindPort`},
		{"bind-port-out-of-range.yaml", `InitConfiguration localAPIEndpoint.bindPort: 70000 is not a port`},
		{"control-plane-endpoint-bad-port.yaml", `ClusterConfiguration controlPlaneEndpoint: "cp.kpr.test:0": port "0" is not a number between 1 and 65535`},
		{"control-plane-endpoint-bad-host.yaml", `ClusterConfiguration controlPlaneEndpoint: host "cp_1.kpr.test" is neither an IP address nor a DNS name`},
		{"control-plane-endpoint-url.yaml", `ClusterConfiguration controlPlaneEndpoint: "https://cp.kpr.test:6443" must be host or host:port, not a URL`},
		{"join-endpoint-bad-port.yaml", `JoinConfiguration discovery.bootstrapToken.apiServerEndpoint: "198.18.0.1:https": port "https"`},
		{"advertise-address-not-ip.yaml", `JoinConfiguration controlPlane.localAPIEndpoint.advertiseAddress: "cp2.kpr.test" is not an IP address`},
		{"dns-domain.yaml", `ClusterConfiguration networking.dnsDomain: "Cluster_Local" is not a DNS domain`},
		{"unknown-apiversion.yaml", `ClusterConfiguration at line 1: apiVersion "kubeadm.k8s.io/v1beta9" is not supported (supported: kubeadm.k8s.io/v1beta4, kubeadm.k8s.io/v1beta3)`},
		{"old-apiversion.yaml", `apiVersion "kubeadm.k8s.io/v1beta2" is not supported`},
		{"unknown-kind.yaml", `kind "ClusterConfig" is not a kubeadm v1beta4 kind`},
		{"duplicate-kind.yaml", `ClusterConfiguration appears twice (lines 1 and 4)`},
		{"missing-kind.yaml", `document at line 1: apiVersion and kind are required`},
		{"not-a-mapping.yaml", `document at line 4 is not a YAML mapping`},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			path := filepath.Join("testdata", "bad", tt.file)
			c, err := Discover(Options{KubeadmConfig: path, KubeletConf: kubeletPath})
			if err == nil {
				t.Fatalf("Discover succeeded with %+v, want an error", c)
			}
			if !strings.HasPrefix(err.Error(), path+": ") || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q\nwant prefix %q and %q", err, path+": ", tt.want)
			}
		})
	}
}

func TestSplitYAML(t *testing.T) {
	in := "--- # leading marker\na: 1\n---\n\n# only a comment\n---\t\nb: 2\n--- c: 3\n"
	docs, err := splitYAML([]byte(in))
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	var lines []int
	for _, d := range docs {
		got = append(got, string(d.data))
		lines = append(lines, d.line)
	}
	want := []string{"", "# leading marker\na: 1\n", "\n# only a comment\n", "b: 2\n", "c: 3\n"}
	wantLines := []int{1, 1, 4, 7, 8}
	if !slices.Equal(got, want) || !slices.Equal(lines, wantLines) {
		t.Errorf("splitYAML = %q at lines %v, want %q at lines %v", got, lines, want, wantLines)
	}
}

// TestKubeadmBinaryDefaults runs the pinned kubeadm and decodes what it prints, so a version
// bump that changes kubeadm's config API is caught here, and checks that the committed
// testdata/kubeadm-print files still say the same.
func TestKubeadmBinaryDefaults(t *testing.T) {
	dir := os.Getenv("KPR_K8S_BINDIR")
	if dir == "" {
		t.Skip("KPR_K8S_BINDIR is not set; point it at the output of hack/k8s.sh bins to check the real kubeadm")
	}
	pki := newTestPKI(t, "cp1")
	tmp := t.TempDir()
	kubeletPath := writeKubeconfig(t, tmp, pki.embedded(kubeletServer))

	for _, tt := range []struct {
		committed string
		args      []string
	}{
		{"init-defaults.yaml", []string{"config", "print", "init-defaults"}},
		{"init-defaults-component-configs.yaml", []string{"config", "print", "init-defaults", "--component-configs", "KubeletConfiguration,KubeProxyConfiguration"}},
		{"join-defaults.yaml", []string{"config", "print", "join-defaults"}},
	} {
		t.Run(tt.committed, func(t *testing.T) {
			out, err := exec.Command(filepath.Join(dir, "kubeadm"), tt.args...).Output()
			if err != nil {
				t.Fatalf("kubeadm %s: %v", strings.Join(tt.args, " "), err)
			}
			live, err := Discover(Options{KubeadmConfig: writeFile(t, filepath.Join(tmp, tt.committed), out), KubeletConf: kubeletPath})
			if err != nil {
				t.Fatalf("decoding the output of kubeadm %s: %v", strings.Join(tt.args, " "), err)
			}
			committed, err := Discover(Options{KubeadmConfig: filepath.Join("testdata", "kubeadm-print", tt.committed), KubeletConf: kubeletPath})
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(live.Endpoints, committed.Endpoints) ||
				!slices.Equal(live.ServiceSubnets, committed.ServiceSubnets) ||
				!slices.Equal(live.PodSubnets, committed.PodSubnets) ||
				live.DNSDomain != committed.DNSDomain {
				t.Errorf("kubeadm %s now gives %q %v %v %q; testdata/kubeadm-print/%s gives %q %v %v %q: regenerate it",
					strings.Join(tt.args, " "), live.Endpoints, live.ServiceSubnets, live.PodSubnets, live.DNSDomain,
					tt.committed, committed.Endpoints, committed.ServiceSubnets, committed.PodSubnets, committed.DNSDomain)
			}
		})
	}
}
