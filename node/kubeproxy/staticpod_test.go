package kubeproxy

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const kubeProxyManifest = `apiVersion: v1
kind: Pod
metadata:
  name: kube-proxy
  namespace: kube-system
  labels:
    component: kube-proxy
spec:
  hostNetwork: true
  containers:
  - name: kube-proxy
    image: registry.k8s.io/kube-proxy:v1.36.3
`

const otherManifest = `apiVersion: v1
kind: Pod
metadata:
  name: kube-apiserver
  namespace: kube-system
spec:
  containers:
  - name: kube-apiserver
    image: registry.k8s.io/kube-apiserver:v1.36.3
`

// startFakeKubeProxy runs sleep under the name kube-proxy, in this test's own namespaces, as
// a static kube-proxy would run in the host's; the returned func ends it (as kubelet would).
func startFakeKubeProxy(t *testing.T) func() {
	t.Helper()
	sleep, err := exec.LookPath("sleep")
	if err != nil {
		t.Skip("no sleep(1)")
	}
	bin := filepath.Join(t.TempDir(), "kube-proxy")
	data, err := os.ReadFile(sleep)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	stop := func() { _ = cmd.Process.Kill(); _, _ = cmd.Process.Wait() }
	t.Cleanup(stop)
	return stop
}

func TestStaticPods(t *testing.T) {
	dir := t.TempDir()
	s := StaticPods{ManifestsDir: filepath.Join(dir, "manifests"), BackupDir: filepath.Join(dir, "backup"), Wait: 5 * time.Second}
	if err := os.MkdirAll(s.ManifestsDir, 0o755); err != nil {
		t.Fatal(err)
	}
	write := func(name, text string) {
		if err := os.WriteFile(filepath.Join(s.ManifestsDir, name), []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("kube-proxy.manifest", kubeProxyManifest)
	write("kube-apiserver.yaml", otherManifest)

	// kubelet stops kube-proxy a second after its manifest goes: Remove waits for it.
	stop := startFakeKubeProxy(t)
	go func() { time.Sleep(time.Second); stop() }()
	started := time.Now()
	moved, err := s.Remove(context.Background())
	if err != nil || len(moved) != 1 || !strings.Contains(moved[0], "kube-proxy.manifest") {
		t.Fatalf("Remove: %v %v", moved, err)
	}
	if waited := time.Since(started); waited < 800*time.Millisecond {
		t.Errorf("Remove returned after %s, before kube-proxy stopped", waited)
	}
	if _, err := os.Stat(filepath.Join(s.ManifestsDir, "kube-proxy.manifest")); err == nil {
		t.Error("the kube-proxy manifest is still in the manifests directory")
	}
	if _, err := os.Stat(filepath.Join(s.ManifestsDir, "kube-apiserver.yaml")); err != nil {
		t.Errorf("another static pod's manifest was touched: %v", err)
	}
	if st, err := os.Stat(filepath.Join(s.BackupDir, "kube-proxy.manifest")); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("backup: %v %v", st, err)
	}
	if moved, err := s.Remove(context.Background()); err != nil || len(moved) != 0 {
		t.Errorf("a second Remove: %v %v; want nothing to do", moved, err)
	}

	// Restore puts it back; a kube-proxy that kubelet never stops is an error naming it.
	back, err := s.Restore()
	if err != nil || len(back) != 1 {
		t.Fatalf("Restore: %v %v", back, err)
	}
	startFakeKubeProxy(t)
	s.Wait = 500 * time.Millisecond
	if _, err := s.Remove(context.Background()); err == nil || !strings.Contains(err.Error(), "has not stopped kube-proxy") {
		t.Errorf("Remove with kube-proxy still running: %v", err)
	}
}
