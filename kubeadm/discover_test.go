package kubeadm

import (
	"bytes"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"k8s.io/client-go/rest"
)

// TestDiscoverKubeconfig covers kubelet.conf handling: embedded and file-referenced
// credentials, endpoint order and deduplication, the APIServers and Kubeconfig overrides, and
// the errors a user gets when files are missing.
func TestDiscoverKubeconfig(t *testing.T) {
	node := newTestPKI(t, "node11")
	admin := newTestPKI(t, "admin")
	combined := append(slices.Clone(node.certPEM), node.keyPEM...)

	tests := []struct {
		name  string
		setup func(t *testing.T, dir string) // writes files into dir
		opts  func(dir string) Options
		// expectations on success
		endpoints []string
		check     func(t *testing.T, dir string, c *Cluster)
		sources   []string
		// or the error must contain all of these (paths may use {dir})
		errHas []string
	}{
		{
			name: "kubelet.conf alone with embedded CA and client credentials",
			setup: func(t *testing.T, dir string) {
				writeKubeconfig(t, dir, node.embedded("https://198.18.0.1:6443"))
			},
			opts:      func(dir string) Options { return Options{KubeletConf: filepath.Join(dir, "kubelet.conf")} },
			endpoints: []string{"https://198.18.0.1:6443"},
			check: func(t *testing.T, dir string, c *Cluster) {
				tls := c.RESTConfig.TLSClientConfig
				if !bytes.Equal(tls.CAData, node.caPEM) || !bytes.Equal(tls.CertData, node.certPEM) || !bytes.Equal(tls.KeyData, node.keyPEM) {
					t.Errorf("RESTConfig TLS data is not kubelet.conf's: %+v", tls)
				}
				if c.RESTConfig.UserAgent != "kpr" {
					t.Errorf("UserAgent = %q, want kpr", c.RESTConfig.UserAgent)
				}
				if c.RESTConfig.Dial == nil {
					t.Error("RESTConfig.Dial is nil, want the failover dialer")
				}
				// The failover dialer ignores the address it is given, so a proxy from the
				// environment must not be used.
				req, _ := http.NewRequest(http.MethodGet, c.RESTConfig.Host, nil)
				if c.RESTConfig.Proxy == nil {
					t.Error("RESTConfig.Proxy is nil: HTTPS_PROXY from the environment would be used")
				} else if u, err := c.RESTConfig.Proxy(req); u != nil || err != nil {
					t.Errorf("RESTConfig.Proxy = %v, %v; want no proxy", u, err)
				}
			},
			sources: []string{
				`endpoint https://198.18.0.1:6443 from {dir}/kubelet.conf cluster "default-cluster" server`,
				`credentials and CA from {dir}/kubelet.conf user "default-auth"`,
				"TLS verifies every endpoint against the name 198.18.0.1",
			},
		},
		{
			name: "relative file references and kubeadm's combined cert+key pem",
			setup: func(t *testing.T, dir string) {
				writeFile(t, filepath.Join(dir, "pki", "ca.crt"), node.caPEM)
				writeFile(t, filepath.Join(dir, "pki", "kubelet-client-current.pem"), combined)
				writeKubeconfig(t, dir, kubeletConf{
					server:   "https://198.18.0.1:6443",
					caFile:   "pki/ca.crt",
					certFile: "pki/kubelet-client-current.pem",
					keyFile:  "pki/kubelet-client-current.pem",
				})
			},
			opts:      func(dir string) Options { return Options{KubeletConf: filepath.Join(dir, "kubelet.conf")} },
			endpoints: []string{"https://198.18.0.1:6443"},
			check: func(t *testing.T, dir string, c *Cluster) {
				tls := c.RESTConfig.TLSClientConfig
				pem := filepath.Join(dir, "pki", "kubelet-client-current.pem")
				if tls.CAFile != filepath.Join(dir, "pki", "ca.crt") || tls.CertFile != pem || tls.KeyFile != pem {
					t.Errorf("TLS files = %q %q %q, want them resolved against %s", tls.CAFile, tls.CertFile, tls.KeyFile, dir)
				}
				// Building the transport loads the CA and the key pair from those files.
				if _, err := rest.TransportFor(c.RESTConfig); err != nil {
					t.Errorf("TransportFor: %v", err)
				}
			},
		},
		{
			name: "client certificate file missing (kubelet never bootstrapped)",
			setup: func(t *testing.T, dir string) {
				writeKubeconfig(t, dir, kubeletConf{
					server:   "https://198.18.0.1:6443",
					caData:   node.caPEM,
					certFile: filepath.Join(dir, "var/lib/kubelet/pki/kubelet-client-current.pem"),
					keyFile:  filepath.Join(dir, "var/lib/kubelet/pki/kubelet-client-current.pem"),
				})
			},
			opts:   func(dir string) Options { return Options{KubeletConf: filepath.Join(dir, "kubelet.conf")} },
			errHas: []string{"{dir}/kubelet.conf", "{dir}/var/lib/kubelet/pki/kubelet-client-current.pem"},
		},
		{
			name: "kubeadm config endpoint first, same endpoint in kubelet.conf deduplicated",
			setup: func(t *testing.T, dir string) {
				writeKubeconfig(t, dir, node.embedded("https://[fd6b:7072:0:0::1]:6443"))
			},
			opts: func(dir string) Options {
				return Options{KubeadmConfig: "testdata/examples/v1beta4-init-ipv6.yaml", KubeletConf: filepath.Join(dir, "kubelet.conf")}
			},
			endpoints: []string{"https://[fd6b:7072::1]:6443"},
			sources: []string{
				`endpoint https://[fd6b:7072::1]:6443 from {dir}/kubelet.conf cluster "default-cluster" server duplicates an earlier endpoint`,
				"TLS verifies every endpoint against the name fd6b:7072::1",
			},
		},
		{
			name: "kubeadm config endpoint first, then kubelet.conf",
			setup: func(t *testing.T, dir string) {
				writeKubeconfig(t, dir, node.embedded("https://198.18.0.1:6443"))
			},
			opts: func(dir string) Options {
				return Options{KubeadmConfig: "testdata/examples/v1beta4-init-dualstack.yaml", KubeletConf: filepath.Join(dir, "kubelet.conf")}
			},
			endpoints: []string{"https://cp.kpr.test:7443", "https://198.18.0.1:6443"},
			sources:   []string{"TLS verifies every endpoint against the name cp.kpr.test"},
		},
		{
			name: "APIServers replace the endpoint list, credentials still from kubelet.conf",
			setup: func(t *testing.T, dir string) {
				writeKubeconfig(t, dir, node.embedded("https://198.18.0.1:6443"))
			},
			opts: func(dir string) Options {
				return Options{
					KubeadmConfig: "testdata/examples/v1beta4-init-dualstack.yaml",
					KubeletConf:   filepath.Join(dir, "kubelet.conf"),
					APIServers:    []string{"198.18.0.9:6443", "https://[fd6b:7072::9]", "CP.kpr.test", "https://198.18.0.9:6443/", "fd6b:7072::10"},
				}
			},
			endpoints: []string{"https://198.18.0.9:6443", "https://[fd6b:7072::9]:443", "https://cp.kpr.test:6443", "https://[fd6b:7072::10]:6443"},
			check: func(t *testing.T, dir string, c *Cluster) {
				if !bytes.Equal(c.RESTConfig.TLSClientConfig.CertData, node.certPEM) {
					t.Error("client certificate is not kubelet.conf's")
				}
			},
			sources: []string{
				"endpoint https://cp.kpr.test:7443 from testdata/examples/v1beta4-init-dualstack.yaml ClusterConfiguration.controlPlaneEndpoint (port 7443 from InitConfiguration.localAPIEndpoint.bindPort) not used: APIServers given",
				`endpoint https://198.18.0.1:6443 from {dir}/kubelet.conf cluster "default-cluster" server not used: APIServers given`,
				"endpoint https://198.18.0.9:6443 from APIServers duplicates an earlier endpoint",
			},
		},
		{
			name:  "APIServers must be https",
			setup: func(t *testing.T, dir string) { writeKubeconfig(t, dir, node.embedded("https://198.18.0.1:6443")) },
			opts: func(dir string) Options {
				return Options{KubeletConf: filepath.Join(dir, "kubelet.conf"), APIServers: []string{"198.18.0.9", "http://198.18.0.9:8080"}}
			},
			errHas: []string{"APIServers[1]", `"http://198.18.0.9:8080": scheme must be https`},
		},
		{
			name: "Kubeconfig replaces kubelet.conf, which is not read",
			setup: func(t *testing.T, dir string) {
				writeFile(t, filepath.Join(dir, "kubelet.conf"), []byte("this is: [not a kubeconfig"))
				writeFile(t, filepath.Join(dir, "admin.conf"), []byte(admin.embedded("https://198.18.0.50:6443").render()))
			},
			opts: func(dir string) Options {
				return Options{KubeletConf: filepath.Join(dir, "kubelet.conf"), Kubeconfig: filepath.Join(dir, "admin.conf")}
			},
			endpoints: []string{"https://198.18.0.50:6443"},
			check: func(t *testing.T, dir string, c *Cluster) {
				if !bytes.Equal(c.RESTConfig.TLSClientConfig.CertData, admin.certPEM) {
					t.Error("client certificate is not the Kubeconfig's")
				}
			},
			sources: []string{"credentials and CA from {dir}/admin.conf"},
		},
		{
			name: "explicit Kubeconfig missing",
			setup: func(t *testing.T, dir string) {
				writeKubeconfig(t, dir, node.embedded("https://198.18.0.1:6443"))
			},
			opts: func(dir string) Options {
				return Options{KubeletConf: filepath.Join(dir, "kubelet.conf"), Kubeconfig: filepath.Join(dir, "admin.conf")}
			},
			errHas: []string{"{dir}/admin.conf", "no such file"},
		},
		{
			name:  "explicit kubeadm config missing",
			setup: func(t *testing.T, dir string) { writeKubeconfig(t, dir, node.embedded("https://198.18.0.1:6443")) },
			opts: func(dir string) Options {
				return Options{KubeadmConfig: filepath.Join(dir, "kubeadm.yaml"), KubeletConf: filepath.Join(dir, "kubelet.conf")}
			},
			errHas: []string{"{dir}/kubeadm.yaml", "no such file"},
		},
		{
			name:   "no kubelet.conf and no kubeadm config",
			setup:  func(t *testing.T, dir string) {},
			opts:   func(dir string) Options { return Options{KubeletConf: filepath.Join(dir, "kubelet.conf")} },
			errHas: []string{"no API server endpoint found", "{dir}/kubelet.conf does not exist"},
		},
		{
			name:  "no kubelet.conf and a kubeadm config without an endpoint",
			setup: func(t *testing.T, dir string) {},
			opts: func(dir string) Options {
				return Options{KubeadmConfig: "testdata/examples/v1beta4-cluster-only.yaml", KubeletConf: filepath.Join(dir, "kubelet.conf")}
			},
			errHas: []string{"no API server endpoint found", "testdata/examples/v1beta4-cluster-only.yaml names no endpoint", "{dir}/kubelet.conf does not exist"},
		},
		{
			name:  "no kubelet.conf yet, endpoint from the kubeadm config",
			setup: func(t *testing.T, dir string) {},
			opts: func(dir string) Options {
				return Options{KubeadmConfig: "testdata/examples/v1beta4-join-worker-ipv6.yaml", KubeletConf: filepath.Join(dir, "kubelet.conf")}
			},
			endpoints: []string{"https://[fd6b:7072::1]:6443"},
			check: func(t *testing.T, dir string, c *Cluster) {
				if c.RESTConfig != nil {
					t.Errorf("RESTConfig = %+v, want nil without credentials", c.RESTConfig)
				}
			},
			sources: []string{"no credentials: {dir}/kubelet.conf does not exist"},
		},
		{
			name:   "kubelet.conf with an http server",
			setup:  func(t *testing.T, dir string) { writeKubeconfig(t, dir, node.embedded("http://198.18.0.1:8080")) },
			opts:   func(dir string) Options { return Options{KubeletConf: filepath.Join(dir, "kubelet.conf")} },
			errHas: []string{`{dir}/kubelet.conf: cluster "default-cluster" server: "http://198.18.0.1:8080": scheme must be https`},
		},
		{
			name: "kubelet.conf with proxy-url",
			setup: func(t *testing.T, dir string) {
				k := node.embedded("https://198.18.0.1:6443")
				k.extraCluster = "    proxy-url: http://198.18.0.254:3128\n"
				writeKubeconfig(t, dir, k)
			},
			opts:   func(dir string) Options { return Options{KubeletConf: filepath.Join(dir, "kubelet.conf")} },
			errHas: []string{`{dir}/kubelet.conf: cluster "default-cluster": proxy-url is not supported`},
		},
		{
			name: "kubelet.conf without a current context",
			setup: func(t *testing.T, dir string) {
				writeFile(t, filepath.Join(dir, "kubelet.conf"), []byte(strings.Replace(node.embedded("https://198.18.0.1:6443").render(),
					"current-context: default-context", "current-context: other", 1)))
			},
			opts:   func(dir string) Options { return Options{KubeletConf: filepath.Join(dir, "kubelet.conf")} },
			errHas: []string{"{dir}/kubelet.conf", "context was not found for specified context: other"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			tt.setup(t, dir)
			sub := func(s string) string { return strings.ReplaceAll(s, "{dir}", dir) }
			c, err := Discover(tt.opts(dir))
			if tt.errHas != nil {
				if err == nil {
					t.Fatalf("Discover = %+v, want an error", c)
				}
				for _, w := range tt.errHas {
					if !strings.Contains(err.Error(), sub(w)) {
						t.Errorf("error %q does not contain %q", err, sub(w))
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(c.Endpoints, tt.endpoints) {
				t.Errorf("Endpoints = %q, want %q", c.Endpoints, tt.endpoints)
			}
			if c.RESTConfig != nil && c.RESTConfig.Host != tt.endpoints[0] {
				t.Errorf("RESTConfig.Host = %q, want %q", c.RESTConfig.Host, tt.endpoints[0])
			}
			if tt.check != nil {
				tt.check(t, dir, c)
			}
			var want []string
			for _, s := range tt.sources {
				want = append(want, sub(s))
			}
			checkSources(t, c.Sources, want, nil)
		})
	}
}

func TestDiscoverDefaultKubeletConf(t *testing.T) {
	if _, err := os.Stat(DefaultKubeletConf); err == nil {
		t.Skipf("%s exists on this machine; the test needs a node without one", DefaultKubeletConf)
	}
	_, err := Discover(Options{})
	if err == nil || !strings.Contains(err.Error(), "/etc/kubernetes/kubelet.conf does not exist") {
		t.Errorf("Discover(Options{}) error = %v, want one naming /etc/kubernetes/kubelet.conf", err)
	}
}
