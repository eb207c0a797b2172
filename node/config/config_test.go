package config

import (
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"
)

func load(t *testing.T, args []string, env map[string]string, file string) (*Config, error) {
	t.Helper()
	fs := pflag.NewFlagSet("test", pflag.ContinueOnError)
	AddFlags(fs)
	if file != "" {
		path := filepath.Join(t.TempDir(), "kpr.yaml")
		if err := os.WriteFile(path, []byte(file), 0o644); err != nil {
			t.Fatal(err)
		}
		args = append(args, "--config", path)
	} else {
		args = append(args, "--config", "")
	}
	if err := fs.Parse(args); err != nil {
		t.Fatal(err)
	}
	for k, v := range env {
		t.Setenv(k, v)
	}
	return Load(fs)
}

func TestDefaults(t *testing.T) {
	c, err := load(t, nil, nil, "")
	if err != nil {
		t.Fatal(err)
	}
	if c.BPFPinDir != "/sys/fs/bpf/kpr" || c.KubeletKubeconfig != "/etc/kubernetes/kubelet.conf" || c.SyncPeriod != 30*time.Second || c.MinSyncPeriod != time.Second || c.FullSyncPeriod != time.Hour || c.ServiceMapSize != 262144 || c.LoadBalancerMode != "snat" || c.Acceleration != "disabled" {
		t.Fatalf("defaults: %+v", c)
	}
}

// Flags win over the environment, which wins over the file.
func TestPrecedence(t *testing.T) {
	file := "nodeName: from-file\nbpfPinDir: /sys/fs/bpf/file\nrunDir: /run/file\nsyncPeriod: 45s\n"
	c, err := load(t, []string{"--node-name", "from-flag"}, map[string]string{"KPR_NODE_NAME": "from-env", "KPR_BPF_PIN_DIR": "/sys/fs/bpf/env"}, file)
	if err != nil {
		t.Fatal(err)
	}
	if c.NodeName != "from-flag" || c.BPFPinDir != "/sys/fs/bpf/env" || c.RunDir != "/run/file" || c.SyncPeriod != 45*time.Second {
		t.Fatalf("precedence: %+v", c)
	}
}

func TestListsFromEnvAndFile(t *testing.T) {
	c, err := load(t, nil, map[string]string{"KPR_SERVICE_CIDRS": "10.96.0.0/16,fd00::/112"}, "apiServers: [https://10.0.0.1:6443, https://10.0.0.2:6443]\n")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(c.ServiceCIDRs, " ") != "10.96.0.0/16 fd00::/112" || len(c.APIServers) != 2 {
		t.Fatalf("%+v", c)
	}
}

// Every error names its key, and all errors come at once.
func TestErrorsNameTheKey(t *testing.T) {
	_, err := load(t, []string{"--bpf-pin-dir", "relative", "--min-sync-period", "2m", "--service-map-size", "0", "--full-sync-period", "0s", "--load-balancer-mode", "direct", "--acceleration", "fast", "--healthz-bind-address", "10256", "--metrics-bind-address", "localhost:10249"},
		map[string]string{"KPR_CLUSTER_CIDR": "10.244.0.0/33"}, "")
	if err == nil {
		t.Fatal("no error")
	}
	for _, key := range []string{"bpfPinDir", "syncPeriod", "serviceMapSize", "clusterCIDR", "fullSyncPeriod", "loadBalancerMode", "acceleration", "healthzBindAddress", "metricsBindAddress"} {
		if !strings.Contains(err.Error(), key+":") {
			t.Errorf("error does not name %s:\n%v", key, err)
		}
	}
}

func TestUnknownKeyInFile(t *testing.T) {
	_, err := load(t, nil, nil, "nodeName: a\nbpfPinDri: /x\n")
	if err == nil || !strings.Contains(err.Error(), `"bpfpindri"`) {
		t.Fatalf("want an error naming the unknown key, got %v", err)
	}
}

func TestBadDurationNamesKey(t *testing.T) {
	_, err := load(t, nil, nil, "syncPeriod: soon\n")
	if err == nil || !strings.Contains(err.Error(), "syncPeriod") && !strings.Contains(err.Error(), "syncperiod") {
		t.Fatalf("want an error naming syncPeriod, got %v", err)
	}
}

func TestMissingExplicitFile(t *testing.T) {
	fs := pflag.NewFlagSet("test", pflag.ContinueOnError)
	AddFlags(fs)
	_ = fs.Parse([]string{"--config", "/nonexistent/kpr.yaml"})
	if _, err := Load(fs); err == nil || !strings.Contains(err.Error(), "/nonexistent/kpr.yaml") {
		t.Fatalf("want an error naming the file, got %v", err)
	}
}

func TestEnvName(t *testing.T) {
	for key, want := range map[string]string{"nodeName": "KPR_NODE_NAME", "bpfPinDir": "KPR_BPF_PIN_DIR", "serviceCIDRs": "KPR_SERVICE_CIDRS", "kubeconfig": "KPR_KUBECONFIG"} {
		if got := EnvName(key); got != want {
			t.Errorf("EnvName(%s) = %s, want %s", key, got, want)
		}
	}
}

// The packaged file documents every key with its default: it loads as the defaults do, and
// with every line enabled it still does.
func TestDefaultFileText(t *testing.T) {
	text := DefaultFileText()
	want, err := load(t, nil, nil, "")
	if err != nil {
		t.Fatal(err)
	}
	if got, err := load(t, nil, nil, text); err != nil || !reflect.DeepEqual(got, want) {
		t.Fatalf("the file as shipped: %+v, %v; want the defaults %+v", got, err, want)
	}
	var enabled []string
	for _, line := range strings.Split(text, "\n") {
		for _, k := range Keys() {
			if rest, ok := strings.CutPrefix(line, "# "+k+": "); ok {
				enabled = append(enabled, k+": "+rest)
			}
		}
	}
	if len(enabled) != len(Keys()) {
		t.Fatalf("the file has %d key lines for %d keys:\n%s", len(enabled), len(Keys()), text)
	}
	got, err := load(t, nil, nil, strings.Join(enabled, "\n")+"\n")
	if err != nil {
		t.Fatalf("every line enabled: %v", err)
	}
	// Empty lists come back as empty, not nil.
	norm := func(c *Config) string { return strings.ReplaceAll(fmt.Sprintf("%+v", *c), "[]", "") }
	if norm(got) != norm(want) {
		t.Fatalf("every line enabled:\n%+v\nwant the defaults:\n%+v", got, want)
	}
}

// An unknown key and a bad value are reported together.
func TestAllErrorsAtOnce(t *testing.T) {
	_, err := load(t, nil, nil, "bpfPinDri: /x\nloadBalancerMode: direct\n")
	if err == nil || !strings.Contains(err.Error(), `"bpfpindri"`) || !strings.Contains(err.Error(), "loadBalancerMode:") {
		t.Fatalf("want both the unknown key and loadBalancerMode named, got %v", err)
	}
}
