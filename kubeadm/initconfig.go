package kubeadm

import (
	"bytes"
	"errors"
	"fmt"
	"path/filepath"
	"slices"

	"gopkg.in/yaml.v3"
)

// kubeProxyPhase is the `kubeadm init` phase that installs the kube-proxy DaemonSet and
// ConfigMap.
const kubeProxyPhase = "addon/kube-proxy"

// DefaultInitConfig is the smallest kubeadm config for a cluster whose nodes run kpr: kubeadm's
// defaults with the kube-proxy addon disabled (v1beta4's proxy.disabled). `kubeadm init
// --config` takes it as it is; add the cluster's own settings to it.
const DefaultInitConfig = `# kubeadm init --config this-file: a cluster without kube-proxy, for kpr.
apiVersion: kubeadm.k8s.io/v1beta4
kind: ClusterConfiguration
proxy:
  # kpr replaces kube-proxy; kubeadm neither installs it nor reinstalls it on upgrade.
  disabled: true
`

// SkipKubeProxy returns data, the kubeadm config file at path, changed so that `kubeadm init` does not
// install kube-proxy, and what it changed: v1beta4 gets proxy.disabled: true in its
// ClusterConfiguration (added when the file has none), v1beta3 (which has no such field) gets
// addon/kube-proxy in its InitConfiguration's skipPhases (added likewise). Documents it does not
// change stay byte for byte as they were, comments included; running it again changes nothing.
// The file must decode as kubeadm decodes it; a file with only a JoinConfiguration is refused,
// since kube-proxy is installed by `kubeadm init`.
func SkipKubeProxy(path string, data []byte) ([]byte, []string, error) {
	f, err := parseKubeadmFile(path, data)
	if err != nil {
		return nil, nil, err
	}
	if f.init == nil && (f.cluster == nil || f.clusterImplied) {
		return nil, nil, fmt.Errorf("%s: no InitConfiguration or ClusterConfiguration: kube-proxy is installed by `kubeadm init`, so patch the file given to it (kpr kubeadm init-config with no file prints one)", path)
	}
	docs, err := splitYAML(data)
	if err != nil {
		return nil, nil, err
	}
	var (
		out        [][]byte
		changes    []string
		version    string
		hasInit    bool
		hasCluster bool
		base       = filepath.Base(path)
	)
	for _, doc := range docs {
		var root yaml.Node
		if err := yaml.Unmarshal(doc.data, &root); err != nil {
			return nil, nil, fmt.Errorf("%s: document at line %d: %w", path, doc.line, err)
		}
		m := mappingOf(&root)
		apiVersion, kind := scalarAt(m, "apiVersion"), scalarAt(m, "kind")
		if m == nil || (kind != kindInit && kind != kindCluster) || (apiVersion != "kubeadm.k8s.io/v1beta3" && apiVersion != "kubeadm.k8s.io/v1beta4") {
			out = append(out, doc.data)
			continue
		}
		version = apiVersion
		changed := false
		switch {
		case kind == kindCluster:
			hasCluster = true
			if apiVersion == "kubeadm.k8s.io/v1beta4" && scalarAt(mappingAt(m, "proxy"), "disabled") != "true" {
				setPath(m, []string{"proxy", "disabled"}, "true", "!!bool")
				changes = append(changes, fmt.Sprintf("%s: ClusterConfiguration (line %d): proxy.disabled: true", base, doc.line))
				changed = true
			}
		case kind == kindInit:
			hasInit = true
			if apiVersion == "kubeadm.k8s.io/v1beta3" && addToList(m, "skipPhases", kubeProxyPhase) {
				changes = append(changes, fmt.Sprintf("%s: InitConfiguration (line %d): skipPhases += %s", base, doc.line, kubeProxyPhase))
				changed = true
			}
		}
		if !changed {
			out = append(out, doc.data)
			continue
		}
		var buf bytes.Buffer
		enc := yaml.NewEncoder(&buf)
		enc.SetIndent(2)
		if err := enc.Encode(&root); err != nil {
			return nil, nil, err
		}
		out = append(out, buf.Bytes())
	}
	switch {
	case version == "kubeadm.k8s.io/v1beta4" && !hasCluster:
		out = append(out, []byte("apiVersion: kubeadm.k8s.io/v1beta4\nkind: ClusterConfiguration\nproxy:\n  disabled: true\n"))
		changes = append(changes, base+": added a ClusterConfiguration with proxy.disabled: true (kubeadm's defaults otherwise)")
	case version == "kubeadm.k8s.io/v1beta3" && !hasInit:
		out = append(out, []byte("apiVersion: kubeadm.k8s.io/v1beta3\nkind: InitConfiguration\nskipPhases:\n  - "+kubeProxyPhase+"\n"))
		changes = append(changes, base+": added an InitConfiguration with skipPhases: ["+kubeProxyPhase+"] (kubeadm's defaults otherwise)")
	}
	return joinYAML(out), changes, nil
}

// joinYAML puts documents back together with "---" lines.
func joinYAML(docs [][]byte) []byte {
	var b bytes.Buffer
	first := true
	for _, d := range docs {
		if len(bytes.TrimSpace(d)) == 0 {
			continue
		}
		if !first {
			b.WriteString("---\n")
		}
		first = false
		b.Write(d)
		if !bytes.HasSuffix(d, []byte("\n")) {
			b.WriteByte('\n')
		}
	}
	return b.Bytes()
}

// mappingOf is the top-level mapping of a document node, or nil.
func mappingOf(doc *yaml.Node) *yaml.Node {
	if doc.Kind == yaml.DocumentNode && len(doc.Content) == 1 && doc.Content[0].Kind == yaml.MappingNode {
		return doc.Content[0]
	}
	return nil
}

func valueAt(m *yaml.Node, key string) *yaml.Node {
	if m == nil || m.Kind != yaml.MappingNode {
		return nil
	}
	for i := 0; i+1 < len(m.Content); i += 2 {
		if m.Content[i].Value == key {
			return m.Content[i+1]
		}
	}
	return nil
}

func mappingAt(m *yaml.Node, key string) *yaml.Node {
	if v := valueAt(m, key); v != nil && v.Kind == yaml.MappingNode {
		return v
	}
	return nil
}

func scalarAt(m *yaml.Node, key string) string {
	if v := valueAt(m, key); v != nil && v.Kind == yaml.ScalarNode {
		return v.Value
	}
	return ""
}

// setPath sets m.path[0].path[1]... to a scalar, making the mappings on the way.
func setPath(m *yaml.Node, path []string, value, tag string) {
	for i, key := range path {
		last := i == len(path)-1
		v := valueAt(m, key)
		if v == nil || (!last && v.Kind != yaml.MappingNode) {
			nv := &yaml.Node{Kind: yaml.MappingNode, Tag: "!!map"}
			if last {
				nv = &yaml.Node{Kind: yaml.ScalarNode}
			}
			if v == nil {
				m.Content = append(m.Content, &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: key}, nv)
			} else {
				*v = *nv
			}
			v = nv
		}
		if last {
			v.Kind, v.Tag, v.Value, v.Style, v.Content = yaml.ScalarNode, tag, value, 0, nil
		} else {
			v.Style &^= yaml.FlowStyle // "proxy: {}" as kubeadm prints it becomes a block
		}
		m = v
	}
}

// addToList appends value to the sequence m.key (made if missing) unless it is there; true if
// it was added.
func addToList(m *yaml.Node, key, value string) bool {
	v := valueAt(m, key)
	if v == nil {
		m.Content = append(m.Content, &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: key},
			&yaml.Node{Kind: yaml.SequenceNode, Tag: "!!seq"})
		v = m.Content[len(m.Content)-1]
	}
	if v.Kind != yaml.SequenceNode {
		*v = yaml.Node{Kind: yaml.SequenceNode, Tag: "!!seq"}
	}
	if slices.ContainsFunc(v.Content, func(n *yaml.Node) bool { return n.Value == value }) {
		return false
	}
	v.Content = append(v.Content, &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: value})
	return true
}

// KubeProxySkipped reports whether the kubeadm config file at path keeps `kubeadm init` from
// installing kube-proxy, as kubeadm itself reads the file.
func KubeProxySkipped(path string) (bool, error) {
	f, err := loadKubeadmFile(path)
	if err != nil {
		return false, err
	}
	if f.cluster != nil && f.cluster.Proxy.Disabled {
		return true, nil
	}
	if f.init != nil && slices.Contains(f.init.SkipPhases, kubeProxyPhase) {
		return true, nil
	}
	if f.init == nil && f.cluster == nil {
		return false, errors.New(path + ": no InitConfiguration or ClusterConfiguration")
	}
	return false, nil
}
