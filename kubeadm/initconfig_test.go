package kubeadm

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// SkipKubeProxy on kubeadm's own defaults and on the documented examples: afterwards kubeadm
// (as it decodes the file) installs no kube-proxy, the documents it had no reason to touch are
// as written, a second run changes nothing, and, with KPR_K8S_BINDIR, the real kubeadm
// accepts the result (kubeadm config validate).
func TestSkipKubeProxy(t *testing.T) {
	kubeadmBin := ""
	if dir := os.Getenv("KPR_K8S_BINDIR"); dir != "" {
		kubeadmBin = filepath.Join(dir, "kubeadm")
	}
	validated := 0
	defer func() {
		if kubeadmBin != "" && validated < 4 {
			t.Errorf("the real kubeadm validated %d of the inputs; want at least 4", validated)
		}
	}()
	for _, tc := range []struct {
		file string
		// kept: text of documents that must come out unchanged.
		kept    []string
		changes int
	}{
		{"kubeadm-print/init-defaults.yaml", nil, 1},
		{"kubeadm-print/init-defaults-component-configs.yaml", []string{"kind: KubeletConfiguration", "kind: KubeProxyConfiguration"}, 1},
		{"examples/v1beta4-cluster-only.yaml", nil, 1},
		{"examples/v1beta4-init-dualstack.yaml", nil, 1},
		{"examples/v1beta4-init-ipv6.yaml", nil, 1},
		{"examples/v1beta3-init.yaml", []string{"timeoutForControlPlane: 4m0s"}, 1},
	} {
		t.Run(tc.file, func(t *testing.T) {
			in := filepath.Join("testdata", tc.file)
			orig, err := os.ReadFile(in)
			if err != nil {
				t.Fatal(err)
			}
			if skipped, err := KubeProxySkipped(in); err != nil || skipped {
				t.Fatalf("before: KubeProxySkipped = %v, %v; want false", skipped, err)
			}
			out, changes, err := SkipKubeProxy(in, orig)
			if err != nil {
				t.Fatal(err)
			}
			if len(changes) != tc.changes {
				t.Errorf("changes %q, want %d", changes, tc.changes)
			}
			patched := filepath.Join(t.TempDir(), filepath.Base(tc.file))
			if err := os.WriteFile(patched, out, 0o644); err != nil {
				t.Fatal(err)
			}
			if skipped, err := KubeProxySkipped(patched); err != nil || !skipped {
				t.Fatalf("after: KubeProxySkipped = %v, %v; want true\n%s", skipped, err, out)
			}
			for _, k := range tc.kept {
				if !bytes.Contains(out, []byte(k)) {
					t.Errorf("%q is gone from the file", k)
				}
			}
			// Every document of the input that needed no change is in the output verbatim.
			docs, _ := splitYAML(orig)
			for _, d := range docs {
				text := strings.TrimSpace(string(d.data))
				if text == "" || strings.Contains(text, "kind: ClusterConfiguration") && strings.Contains(text, "v1beta4") ||
					strings.Contains(text, "kind: InitConfiguration") && strings.Contains(text, "v1beta3") {
					continue
				}
				if !bytes.Contains(out, []byte(text)) {
					t.Errorf("the document at line %d changed:\n%s", d.line, text)
				}
			}
			again, changes, err := SkipKubeProxy(patched, out)
			if err != nil || len(changes) != 0 || !bytes.Equal(again, out) {
				t.Errorf("second run: %v changes %q; output changed: %v", err, changes, !bytes.Equal(again, out))
			}
			// Whatever kubeadm accepted before, it accepts after (an example with a name
			// kubeadm's own validation refuses, CP.kpr.test, is only decoded above).
			if kubeadmBin != "" {
				if _, err := exec.Command(kubeadmBin, "config", "validate", "--config", in).CombinedOutput(); err == nil {
					validated++
					if msg, err := exec.Command(kubeadmBin, "config", "validate", "--config", patched).CombinedOutput(); err != nil {
						t.Errorf("kubeadm config validate: %v\n%s\n%s", err, msg, out)
					}
				}
			}
		})
	}
}

// The file printed without input disables the addon and is valid for the real kubeadm.
func TestDefaultInitConfig(t *testing.T) {
	path := filepath.Join(t.TempDir(), "kubeadm.yaml")
	if err := os.WriteFile(path, []byte(DefaultInitConfig), 0o644); err != nil {
		t.Fatal(err)
	}
	if skipped, err := KubeProxySkipped(path); err != nil || !skipped {
		t.Fatalf("KubeProxySkipped = %v, %v; want true", skipped, err)
	}
	if dir := os.Getenv("KPR_K8S_BINDIR"); dir != "" {
		if msg, err := exec.Command(filepath.Join(dir, "kubeadm"), "config", "validate", "--config", path).CombinedOutput(); err != nil {
			t.Errorf("kubeadm config validate: %v\n%s", err, msg)
		}
	}
}

// kube-proxy is installed by kubeadm init: a join-only file is refused, saying so.
func TestSkipKubeProxyJoinOnly(t *testing.T) {
	path := filepath.Join("testdata", "examples", "v1beta4-join-worker-ipv6.yaml")
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = SkipKubeProxy(path, data)
	if err == nil || !strings.Contains(err.Error(), "kubeadm init") {
		t.Fatalf("want an error pointing at kubeadm init, got %v", err)
	}
}
