package kubeadm

import (
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"net/netip"
	"net/url"
	"os"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// DefaultKubeletConf is where kubeadm writes the kubelet's kubeconfig on every node.
const DefaultKubeletConf = "/etc/kubernetes/kubelet.conf"

// userAgent identifies kpr in the API server's audit log and metrics.
const userAgent = "kpr"

// Options says which files describe the node. The zero value reads only kubelet.conf.
type Options struct {
	// KubeadmConfig is an optional kubeadm config file (multi-document YAML with
	// InitConfiguration, ClusterConfiguration and/or JoinConfiguration, v1beta3 or v1beta4;
	// documents of other API groups such as KubeletConfiguration are ignored). If set, it must
	// exist.
	KubeadmConfig string
	// KubeletConf is the kubelet's kubeconfig, default DefaultKubeletConf. It gives one more
	// endpoint, the CA and the client credentials. It may be missing (a node before `kubeadm
	// init/join`) as long as an endpoint is known from elsewhere; RESTConfig is nil then.
	KubeletConf string
	// Kubeconfig replaces KubeletConf as the source of server, CA and credentials; kubelet.conf
	// is then not read. If set, it must exist.
	Kubeconfig string
	// APIServers replaces the endpoint list: "https://host:port", "https://host" (port 443),
	// "host:port" or "host" (port 6443). IPv6 literals need brackets when a port follows.
	// Credentials still come from Kubeconfig or KubeletConf, whose server is then not used.
	APIServers []string
}

// Cluster is what the node's files say about the cluster.
type Cluster struct {
	// Endpoints are the API server URLs (https://host:port) in failover order, deduplicated:
	// APIServers, or the kubeadm config's endpoint followed by the kubeconfig's server.
	Endpoints []string
	// ServiceSubnets and PodSubnets are ClusterConfiguration's networking.serviceSubnet and
	// networking.podSubnet (one CIDR, or two for dual-stack), host bits masked. Empty when
	// unknown: no kubeadm config file, a file with only a JoinConfiguration, or no podSubnet.
	ServiceSubnets []netip.Prefix
	PodSubnets     []netip.Prefix
	// DNSDomain is networking.dnsDomain; empty when unknown like the subnets.
	DNSDomain string
	// Sources explains every value above, one line each: which file and field it came from,
	// whether kubeadm's default filled it in, and what was ignored.
	Sources []string
	// RESTConfig is ready for client-go, or nil when no kubeconfig exists yet. Host is
	// Endpoints[0], and Dial connects to the first endpoint that accepts a TCP connection,
	// starting from the one that last did, with a short timeout per attempt; proxies from
	// the environment are not used.
	//
	// TLS is always verified against Endpoints[0]'s host (or the kubeconfig's
	// tls-server-name), whichever endpoint was dialed, so every API server's serving
	// certificate must cover that name. kubeadm's certificates do: they carry the
	// controlPlaneEndpoint and the node's advertise address as SANs.
	RESTConfig *rest.Config
}

// Discover reads the node's kubeadm files. It never uses the in-cluster config or the
// `kubernetes` Service, which a kube-proxy replacement cannot rely on.
func Discover(opts Options) (*Cluster, error) {
	c := &Cluster{}
	var eps endpointList

	var fileEP *endpoint
	var fileEPFrom string
	if opts.KubeadmConfig != "" {
		f, err := loadKubeadmFile(opts.KubeadmConfig)
		if err != nil {
			return nil, err
		}
		s, err := f.settings()
		if err != nil {
			return nil, err
		}
		c.ServiceSubnets, c.PodSubnets, c.DNSDomain = s.serviceSubnets, s.podSubnets, s.dnsDomain
		c.Sources = append(c.Sources, s.sources...)
		fileEP, fileEPFrom = s.endpoint, s.endpointFrom
	} else {
		c.Sources = append(c.Sources, "service and pod subnets unknown: no kubeadm config file given")
	}

	if len(opts.APIServers) > 0 {
		for i, s := range opts.APIServers {
			ep, err := parseAPIServer(s)
			if err != nil {
				return nil, fmt.Errorf("APIServers[%d]: %w", i, err)
			}
			eps.add(ep, "APIServers")
		}
		if fileEP != nil {
			c.Sources = append(c.Sources, fmt.Sprintf("endpoint %s from %s not used: APIServers given", fileEP.url(), fileEPFrom))
		}
	} else if fileEP != nil {
		eps.add(*fileEP, fileEPFrom)
	}

	kcPath, explicit := opts.Kubeconfig, true
	if kcPath == "" {
		kcPath, explicit = opts.KubeletConf, false
		if kcPath == "" {
			kcPath = DefaultKubeletConf
		}
	}
	// Only a missing kubeconfig itself is tolerated; a kubeconfig naming a missing
	// certificate file is broken and an error.
	_, statErr := os.Stat(kcPath)
	missing := errors.Is(statErr, fs.ErrNotExist)
	var kc *kubeconfig
	var err error
	if !missing {
		kc, err = loadKubeconfig(kcPath)
	}
	var credSources []string
	switch {
	case missing && explicit:
		return nil, fmt.Errorf("kubeconfig: %w", statErr)
	case err != nil:
		return nil, err
	case missing && len(eps.eps) == 0:
		tried := kcPath + " does not exist"
		if opts.KubeadmConfig != "" {
			tried = opts.KubeadmConfig + " names no endpoint, " + tried
		}
		return nil, fmt.Errorf("no API server endpoint found: %s", tried)
	case missing:
		credSources = append(credSources, fmt.Sprintf("no credentials: %s does not exist (kubeadm writes it at init/join), RESTConfig is nil", kcPath))
	default:
		from := fmt.Sprintf("%s cluster %q server", kcPath, kc.clusterName)
		if len(opts.APIServers) > 0 {
			credSources = append(credSources, fmt.Sprintf("endpoint %s from %s not used: APIServers given", kc.server.url(), from))
		} else {
			eps.add(kc.server, from)
		}
	}

	c.Sources = append(c.Sources, eps.sources...)
	c.Sources = append(c.Sources, credSources...)
	addrs := make([]string, len(eps.eps))
	for i, e := range eps.eps {
		c.Endpoints = append(c.Endpoints, e.url())
		addrs[i] = e.hostPort()
	}
	if kc == nil {
		return c, nil
	}

	cfg := kc.rest
	cfg.Host = c.Endpoints[0]
	cfg.UserAgent = userAgent
	// The dialer ignores the address it is asked for, so an HTTP proxy from the environment
	// would be bypassed half-way; the API server is always dialed directly.
	cfg.Proxy = func(*http.Request) (*url.URL, error) { return nil, nil }
	cfg.Dial = newFailoverDialer(addrs).DialContext
	c.RESTConfig = cfg

	serverName := cfg.TLSClientConfig.ServerName
	if serverName == "" {
		serverName = eps.eps[0].host
	}
	c.Sources = append(c.Sources,
		fmt.Sprintf("credentials and CA from %s user %q", kcPath, kc.userName),
		fmt.Sprintf("TLS verifies every endpoint against the name %s: each API server's certificate must cover it", serverName))
	return c, nil
}

type kubeconfig struct {
	rest        *rest.Config
	server      endpoint
	clusterName string
	userName    string
}

// loadKubeconfig loads a kubeconfig with client-go's own loader, resolving relative
// certificate paths against the file's directory. File references such as kubeadm's
// /var/lib/kubelet/pki/kubelet-client-current.pem stay file references, so client-go picks up
// the kubelet's certificate rotation.
func loadKubeconfig(path string) (*kubeconfig, error) {
	raw, err := clientcmd.LoadFromFile(path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	// LoadFromFile records each entry's file; this makes relative paths absolute against it,
	// as kubectl's loading rules do.
	if err := clientcmd.ResolveLocalPaths(raw); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	kc := &kubeconfig{}
	if ctx := raw.Contexts[raw.CurrentContext]; ctx != nil {
		kc.clusterName, kc.userName = ctx.Cluster, ctx.AuthInfo
	}
	cfg, err := clientcmd.NewNonInteractiveClientConfig(*raw, raw.CurrentContext, &clientcmd.ConfigOverrides{}, nil).ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if cfg.Proxy != nil {
		return nil, fmt.Errorf("%s: cluster %q: proxy-url is not supported: kpr dials the API server endpoints directly", path, kc.clusterName)
	}
	if kc.server, err = parseServerURL(raw.Clusters[kc.clusterName].Server); err != nil {
		return nil, fmt.Errorf("%s: cluster %q server: %w", path, kc.clusterName, err)
	}
	kc.rest = cfg
	return kc, nil
}
