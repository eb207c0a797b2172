package config

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"sort"
	"strings"
	"time"

	v1 "k8s.io/api/core/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	kpv1 "k8s.io/kube-proxy/config/v1alpha1"
	"sigs.k8s.io/yaml"
)

// kubeadmProxyKubeconfig is where kubeadm's kube-proxy DaemonSet mounts its kubeconfig, inside
// the pod: it does not exist on the node.
const kubeadmProxyKubeconfig = "/var/lib/kube-proxy/kubeconfig.conf"

// Import is a KubeProxyConfiguration carried over to kpr.
type Import struct {
	// Settings are the kpr keys that take kube-proxy's values, each with the kube-proxy field
	// it comes from.
	Settings []ImportedSetting
	// Unmatched are the kube-proxy settings kpr has no equivalent for, each with its value and
	// what kpr does instead; settings left at kube-proxy's defaults are not listed.
	Unmatched []string
}

// ImportedSetting is one kpr key taken from kube-proxy's configuration.
type ImportedSetting struct {
	Key   string
	Value any
	From  string // the kube-proxy field
	Note  string // how the meaning carries over, when it needs saying
}

// ImportKubeProxy converts kube-proxy's configuration: a KubeProxyConfiguration (v1alpha1), the
// kube-proxy ConfigMap that holds one as config.conf (as kubeadm creates it), or a
// multi-document file with one of them (such as `kubeadm config print init-defaults
// --component-configs KubeProxyConfiguration`). Unknown fields are errors that name them.
func ImportKubeProxy(data []byte) (*Import, error) {
	kp, err := findKubeProxyConfig(data)
	if err != nil {
		return nil, err
	}
	im := &Import{}
	set := func(key string, value any, from, note string) {
		im.Settings = append(im.Settings, ImportedSetting{key, value, from, note})
	}
	unmatched := func(format string, args ...any) { im.Unmatched = append(im.Unmatched, fmt.Sprintf(format, args...)) }

	mode := string(kp.Mode)
	if mode == "" {
		mode = "iptables" // kube-proxy's default on Linux
	}
	unmatched("mode (%s): kpr has one datapath, eBPF, in place of every kube-proxy mode", mode)

	if c := kp.ClientConnection.Kubeconfig; c != "" {
		if c == kubeadmProxyKubeconfig {
			unmatched("clientConnection.kubeconfig (%s): kubeadm's kubeconfig inside the kube-proxy pod, with its service account; kpr runs on the node and uses the node's kubelet.conf (kubeletKubeconfig)", c)
		} else {
			set("kubeconfig", c, "clientConnection.kubeconfig", "the file must exist on the node, not only inside a pod")
		}
	}
	if q := kp.ClientConnection; q.QPS != 0 || q.Burst != 0 || q.ContentType != "" || q.AcceptContentTypes != "" {
		unmatched("clientConnection qps/burst/contentType (%v/%d/%q): kpr sets its own client limits and uses protobuf", q.QPS, q.Burst, q.ContentType)
	}
	if kp.HostnameOverride != "" {
		set("nodeName", kp.HostnameOverride, "hostnameOverride", "")
	}
	if kp.BindAddress != "" && kp.BindAddress != "0.0.0.0" && kp.BindAddress != "::" {
		unmatched("bindAddress (%s): kpr takes the node's addresses from its devices (devices, nodePortAddresses)", kp.BindAddress)
	}
	if a := kp.HealthzBindAddress; a != "" {
		if _, _, err := net.SplitHostPort(a); err != nil {
			a = net.JoinHostPort(a, "10256") // kube-proxy adds its default port to a bare address
		}
		if a != "0.0.0.0:10256" {
			set("healthzBindAddress", a, "healthzBindAddress", "")
		}
	}
	if a := kp.MetricsBindAddress; a != "" {
		if _, _, err := net.SplitHostPort(a); err != nil {
			a = net.JoinHostPort(a, "10249") // kube-proxy adds its default port to a bare address
		}
		if a != "127.0.0.1:10249" {
			set("metricsBindAddress", a, "metricsBindAddress", "kpr serves kube-proxy's sync metrics under their names there")
		}
	}
	if kp.BindAddressHardFail {
		unmatched("bindAddressHardFail (true): kpr logs a health server it cannot start and keeps serving, as kube-proxy does by default")
	}
	if kp.EnableProfiling {
		unmatched("enableProfiling (true): kpr serves no profiling endpoint")
	}

	// The sync periods of the mode in use.
	var syncPeriod, minSyncPeriod time.Duration
	switch mode {
	case "nftables":
		syncPeriod, minSyncPeriod = kp.NFTables.SyncPeriod.Duration, kp.NFTables.MinSyncPeriod.Duration
	case "ipvs":
		syncPeriod, minSyncPeriod = kp.IPVS.SyncPeriod.Duration, kp.IPVS.MinSyncPeriod.Duration
	default:
		syncPeriod, minSyncPeriod = kp.IPTables.SyncPeriod.Duration, kp.IPTables.MinSyncPeriod.Duration
	}
	if syncPeriod > 0 {
		set("syncPeriod", syncPeriod.String(), mode+".syncPeriod", "")
	}
	if minSyncPeriod > 0 {
		set("minSyncPeriod", minSyncPeriod.String(), mode+".minSyncPeriod", "")
	}
	if kp.IPTables.MasqueradeAll || kp.NFTables.MasqueradeAll {
		unmatched("masqueradeAll (true): kpr's socket-level load balancing keeps a pod's own address towards ClusterIPs; traffic from outside is SNATed or not as loadBalancerMode says")
	}
	if kp.IPTables.MasqueradeBit != nil || kp.NFTables.MasqueradeBit != nil {
		unmatched("masqueradeBit: kpr marks no packets")
	}
	if l := kp.IPTables.LocalhostNodePorts; l != nil && !*l {
		unmatched("iptables.localhostNodePorts (false): kpr always serves a NodePort to local sockets on 127.0.0.1, as on the node's addresses (socket-level load balancing, no route_localnet)")
	}
	if v := kp.IPVS; v.Scheduler != "" || len(v.ExcludeCIDRs) > 0 || v.StrictARP || v.TCPTimeout.Duration != 0 || v.TCPFinTimeout.Duration != 0 || v.UDPTimeout.Duration != 0 {
		unmatched("ipvs (scheduler %q, excludeCIDRs %v, strictARP %v, timeouts): kpr chooses backends with Maglev or at random (loadBalancerAlgorithm) and keeps its own flow table", v.Scheduler, v.ExcludeCIDRs, v.StrictARP)
	}

	switch kp.DetectLocalMode {
	case "", "ClusterCIDR":
	default:
		unmatched("detectLocalMode (%s): kpr tells pod traffic by the pod CIDRs (clusterCIDR, nonMasqueradeCIDRs)", kp.DetectLocalMode)
	}
	if kp.ClusterCIDR != "" {
		var cidrs []string
		for _, c := range strings.Split(kp.ClusterCIDR, ",") {
			if c = strings.TrimSpace(c); c != "" {
				cidrs = append(cidrs, c)
			}
		}
		set("clusterCIDR", cidrs, "clusterCIDR", "")
	}
	switch {
	case len(kp.NodePortAddresses) > 0:
		set("nodePortAddresses", kp.NodePortAddresses, "nodePortAddresses", "")
	case mode != "nftables":
		set("nodePortAddresses", []string{"all"}, "nodePortAddresses (unset)",
			"kube-proxy's "+mode+" mode serves NodePorts on every address of the node when the field is unset; kpr's own default is each family's primary address")
	}
	if kp.OOMScoreAdj != nil && *kp.OOMScoreAdj != -999 {
		unmatched("oomScoreAdj (%d): set OOMScoreAdjust= in a drop-in for kpr.service", *kp.OOMScoreAdj)
	}
	ct := kp.Conntrack
	if ct.MaxPerCore != nil || ct.Min != nil || ct.TCPEstablishedTimeout != nil || ct.TCPCloseWaitTimeout != nil || ct.TCPBeLiberal || ct.UDPTimeout.Duration != 0 || ct.UDPStreamTimeout.Duration != 0 {
		unmatched("conntrack (maxPerCore, min, timeouts): kpr does not change the kernel's conntrack settings; its north-south flows are in its own table (conntrackMapSize) with their own idle timeouts")
	}
	if d := kp.ConfigSyncPeriod.Duration; d != 0 && d != 15*time.Minute {
		unmatched("configSyncPeriod (%s): kpr's informers do not resync; a full sync every fullSyncPeriod checks the datapath instead", d)
	}
	if kp.PortRange != "" {
		unmatched("portRange (%s): deprecated in kube-proxy and unused", kp.PortRange)
	}
	if len(kp.FeatureGates) > 0 {
		var gates []string
		for g, on := range kp.FeatureGates {
			gates = append(gates, fmt.Sprintf("%s=%v", g, on))
		}
		sort.Strings(gates)
		unmatched("featureGates (%s): kpr has no feature gates", strings.Join(gates, ","))
	}
	if kp.ShowHiddenMetricsForVersion != "" {
		unmatched("showHiddenMetricsForVersion (%s): kpr hides no metrics", kp.ShowHiddenMetricsForVersion)
	}
	return im, nil
}

// findKubeProxyConfig returns the KubeProxyConfiguration in data (see ImportKubeProxy).
func findKubeProxyConfig(data []byte) (*kpv1.KubeProxyConfiguration, error) {
	var kinds []string
	docs := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	for {
		doc, err := docs.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, err
		}
		var tm struct {
			APIVersion string            `json:"apiVersion"`
			Kind       string            `json:"kind"`
			Data       map[string]string `json:"data"`
		}
		if err := yaml.Unmarshal(doc, &tm); err != nil {
			return nil, err
		}
		switch {
		case tm.Kind == "KubeProxyConfiguration":
			if tm.APIVersion != kpv1.SchemeGroupVersion.String() {
				return nil, fmt.Errorf("KubeProxyConfiguration apiVersion %q: want %s", tm.APIVersion, kpv1.SchemeGroupVersion)
			}
			var kp kpv1.KubeProxyConfiguration
			if err := yaml.UnmarshalStrict(doc, &kp); err != nil {
				return nil, fmt.Errorf("KubeProxyConfiguration: %w", err)
			}
			return &kp, nil
		case tm.Kind == "ConfigMap" && tm.APIVersion == "v1":
			var cm v1.ConfigMap
			if err := yaml.Unmarshal(doc, &cm); err != nil {
				return nil, err
			}
			inner, ok := cm.Data["config.conf"]
			if !ok {
				return nil, fmt.Errorf("ConfigMap %s/%s has no data.config.conf (kube-proxy's configuration, as kubeadm writes it)", cm.Namespace, cm.Name)
			}
			kp, err := findKubeProxyConfig([]byte(inner))
			if err != nil {
				return nil, fmt.Errorf("ConfigMap %s/%s data.config.conf: %w", cm.Namespace, cm.Name, err)
			}
			return kp, nil
		case tm.Kind != "":
			kinds = append(kinds, tm.Kind)
		}
	}
	if len(kinds) > 0 {
		return nil, fmt.Errorf("no KubeProxyConfiguration (or kube-proxy ConfigMap) among %s", strings.Join(kinds, ", "))
	}
	return nil, errors.New("no KubeProxyConfiguration: the file holds no YAML object with a kind")
}

// YAML writes the settings as a kpr configuration file, each with where it came from.
func (im *Import) YAML(source string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "# kpr settings carried over from kube-proxy's configuration %s\n", source)
	b.WriteString("# by `kpr config import-kube-proxy`. Every other key keeps kpr's default (`kpr config defaults`).\n")
	for _, s := range im.Settings {
		b.WriteString("\n# from kube-proxy's " + s.From)
		if s.Note != "" {
			b.WriteString(": " + s.Note)
		}
		b.WriteString("\n")
		fmt.Fprintf(&b, "%s: %s\n", s.Key, yamlValue(s.Value))
	}
	return b.String()
}
