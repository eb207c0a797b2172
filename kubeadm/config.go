package kubeadm

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strings"

	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	jsonserializer "k8s.io/apimachinery/pkg/runtime/serializer/json"
	kubeadmapi "k8s.io/kubernetes/cmd/kubeadm/app/apis/kubeadm"
	kubeadmscheme "k8s.io/kubernetes/cmd/kubeadm/app/apis/kubeadm/scheme"
	"k8s.io/kubernetes/cmd/kubeadm/app/apis/kubeadm/v1beta3"
	"k8s.io/kubernetes/cmd/kubeadm/app/apis/kubeadm/v1beta4"
	"sigs.k8s.io/yaml"
)

const (
	kindInit    = "InitConfiguration"
	kindCluster = "ClusterConfiguration"
	kindJoin    = "JoinConfiguration"

	// placeholderAdvertiseAddress is what `kubeadm config print init-defaults` prints for
	// localAPIEndpoint.advertiseAddress; a file still carrying it was probably never edited.
	placeholderAdvertiseAddress = "1.2.3.4"
)

// supportedVersions are the kubeadm API versions Discover decodes, newest first.
var supportedVersions = []schema.GroupVersion{v1beta4.SchemeGroupVersion, v1beta3.SchemeGroupVersion}

// kubeadmFile is a decoded kubeadm config file, converted to kubeadm's internal types after
// kubeadm's static defaulting. written keeps each document as written, so Sources can say
// whether a value came from the file or from kubeadm's defaults.
type kubeadmFile struct {
	path string

	cluster *kubeadmapi.ClusterConfiguration
	// clusterImplied: no ClusterConfiguration document, but an InitConfiguration implies
	// kubeadm's default one, as `kubeadm init --config` does.
	clusterImplied bool

	init *kubeadmapi.InitConfiguration
	join *kubeadmapi.JoinConfiguration

	written map[string]map[string]any // kind -> document as written

	notes []string
}

// inFile reports whether the document of kind sets the dotted field to a non-empty value.
// The fields Discover reads have the same JSON names in v1beta3 and v1beta4.
func (f *kubeadmFile) inFile(kind, field string) bool {
	var v any = f.written[kind]
	for _, name := range strings.Split(field, ".") {
		m, ok := v.(map[string]any)
		if !ok {
			return false
		}
		v = m[name]
	}
	switch v := v.(type) {
	case nil:
		return false
	case string:
		return v != ""
	case float64:
		return v != 0
	}
	return true
}

// yamlDoc is one document of a multi-document YAML file.
type yamlDoc struct {
	line int // 1-based line of the document's first line, for error messages
	data []byte
}

// splitYAML splits a multi-document YAML stream at "---" lines. Text after the marker and a
// blank ("--- # init", "--- {kind: ...}") belongs to the next document. Block scalars are
// indented, so a column-0 "---" is always a document marker.
func splitYAML(data []byte) ([]yamlDoc, error) {
	var (
		docs []yamlDoc
		cur  bytes.Buffer
		line = 0
		from = 1
	)
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 64*1024), len(data)+1)
	for sc.Scan() {
		line++
		text := sc.Text()
		if text == "---" || strings.HasPrefix(text, "--- ") || strings.HasPrefix(text, "---\t") {
			docs = append(docs, yamlDoc{line: from, data: bytes.Clone(cur.Bytes())})
			cur.Reset()
			from = line + 1
			if rest := strings.TrimSpace(text[3:]); rest != "" {
				cur.WriteString(rest)
				cur.WriteByte('\n')
				from = line
			}
			continue
		}
		cur.WriteString(text)
		cur.WriteByte('\n')
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	docs = append(docs, yamlDoc{line: from, data: cur.Bytes()})
	return docs, nil
}

// loadKubeadmFile reads and strictly decodes a kubeadm config file.
func loadKubeadmFile(path string) (*kubeadmFile, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("kubeadm config: %w", err)
	}
	return parseKubeadmFile(path, data)
}

// parseKubeadmFile strictly decodes data, a kubeadm config file; path names it in errors.
func parseKubeadmFile(path string, data []byte) (*kubeadmFile, error) {
	docs, err := splitYAML(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	// kubeadm's scheme registers the internal and both public versions with their defaulting
	// and conversion functions. Strict mode turns unknown and duplicate fields into errors,
	// which kubeadm's default codecs would silently drop.
	strict := jsonserializer.NewSerializerWithOptions(jsonserializer.DefaultMetaFactory, kubeadmscheme.Scheme, kubeadmscheme.Scheme,
		jsonserializer.SerializerOptions{Yaml: true, Strict: true})

	f := &kubeadmFile{path: path, written: map[string]map[string]any{}}
	seen := map[string]int{}
	var initGV schema.GroupVersion
	for _, doc := range docs {
		var written map[string]any
		if err := yaml.Unmarshal(doc.data, &written); err != nil {
			return nil, fmt.Errorf("%s: document at line %d is not a YAML mapping: %v", path, doc.line, err)
		}
		if written == nil {
			continue // empty document, e.g. before a leading "---"
		}
		var tm struct{ APIVersion, Kind string }
		tm.APIVersion, _ = written["apiVersion"].(string)
		tm.Kind, _ = written["kind"].(string)
		if tm.APIVersion == "" || tm.Kind == "" {
			return nil, fmt.Errorf("%s: document at line %d: apiVersion and kind are required", path, doc.line)
		}
		gv, err := schema.ParseGroupVersion(tm.APIVersion)
		if err != nil {
			return nil, fmt.Errorf("%s: %s at line %d: apiVersion %q: %v", path, tm.Kind, doc.line, tm.APIVersion, err)
		}
		if gv.Group != kubeadmapi.GroupName {
			// KubeletConfiguration, KubeProxyConfiguration and the like travel in the same file.
			f.notes = append(f.notes, fmt.Sprintf("ignored %s (%s) at %s line %d", tm.Kind, tm.APIVersion, path, doc.line))
			continue
		}
		if !isSupported(gv) {
			return nil, fmt.Errorf("%s: %s at line %d: apiVersion %q is not supported (supported: %s)",
				path, tm.Kind, doc.line, tm.APIVersion, supportedList())
		}
		gvk := gv.WithKind(tm.Kind)
		switch tm.Kind {
		case kindInit, kindCluster, kindJoin:
		default:
			if kubeadmscheme.Scheme.Recognizes(gvk) {
				f.notes = append(f.notes, fmt.Sprintf("ignored %s (%s) at %s line %d", tm.Kind, tm.APIVersion, path, doc.line))
				continue
			}
			return nil, fmt.Errorf("%s: document at line %d: kind %q is not a kubeadm %s kind", path, doc.line, tm.Kind, gv.Version)
		}
		if prev, dup := seen[tm.Kind]; dup {
			return nil, fmt.Errorf("%s: %s appears twice (lines %d and %d)", path, tm.Kind, prev, doc.line)
		}
		seen[tm.Kind] = doc.line
		if tm.Kind == kindInit {
			initGV = gv
		}

		obj, _, err := strict.Decode(doc.data, &gvk, nil)
		if err != nil {
			return nil, fmt.Errorf("%s: %s at line %d: %v", path, tm.Kind, doc.line, err)
		}
		f.written[tm.Kind] = written
		if err := f.set(obj, tm.Kind); err != nil {
			return nil, fmt.Errorf("%s: %s at line %d: %v", path, tm.Kind, doc.line, err)
		}
	}
	if f.cluster == nil && f.init != nil {
		if err := f.impliedCluster(initGV); err != nil {
			return nil, fmt.Errorf("%s: default ClusterConfiguration for the InitConfiguration: %v", path, err)
		}
	}
	return f, nil
}

// set defaults a decoded versioned object with kubeadm's static defaults and converts it to
// kubeadm's internal type, as kubeadm does when it loads a config file.
func (f *kubeadmFile) set(versioned runtime.Object, kind string) error {
	kubeadmscheme.Scheme.Default(versioned)
	var out any
	switch kind {
	case kindCluster:
		f.cluster = &kubeadmapi.ClusterConfiguration{}
		out = f.cluster
	case kindInit:
		f.init = &kubeadmapi.InitConfiguration{}
		out = f.init
	case kindJoin:
		f.join = &kubeadmapi.JoinConfiguration{}
		out = f.join
	default:
		return fmt.Errorf("unexpected kind %q", kind)
	}
	return kubeadmscheme.Scheme.Convert(versioned, out, nil)
}

// impliedCluster gives an InitConfiguration without a ClusterConfiguration kubeadm's default
// ClusterConfiguration of the same API version, which is what `kubeadm init` would use.
func (f *kubeadmFile) impliedCluster(gv schema.GroupVersion) error {
	obj, err := kubeadmscheme.Scheme.New(gv.WithKind(kindCluster))
	if err != nil {
		return err
	}
	if err := f.set(obj, kindCluster); err != nil {
		return err
	}
	f.clusterImplied = true
	return nil
}

func isSupported(gv schema.GroupVersion) bool {
	for _, v := range supportedVersions {
		if gv == v {
			return true
		}
	}
	return false
}

func supportedList() string {
	s := make([]string, len(supportedVersions))
	for i, v := range supportedVersions {
		s[i] = v.String()
	}
	return strings.Join(s, ", ")
}
