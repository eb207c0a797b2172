package agent

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/kpr-dev/kpr/kubeadm"
	"github.com/kpr-dev/kpr/node/config"
)

// networking is the cluster networking the agent uses: kpr's own settings first, then the
// node's kubeadm files. Each value says where it came from, for the log and `kpr status`.
type networking struct {
	serviceCIDRs     []netip.Prefix
	serviceCIDRsFrom string
	podCIDRs         []netip.Prefix
	podCIDRsFrom     string
	dnsDomain        string
	dnsDomainFrom    string
}

// effectiveNetworking chooses between the config keys serviceCIDRs and clusterCIDR and what
// kubeadm.Discover found (cluster may be nil). Config CIDRs are masked like kubeadm's.
func effectiveNetworking(cfg *config.Config, cluster *kubeadm.Cluster) (networking, error) {
	if cluster == nil {
		cluster = &kubeadm.Cluster{}
	}
	var n networking
	var err error
	if n.serviceCIDRs, n.serviceCIDRsFrom, err = pickCIDRs("serviceCIDRs", cfg.ServiceCIDRs, cluster.ServiceSubnets, "serviceSubnet", cfg, cluster); err != nil {
		return networking{}, err
	}
	if n.podCIDRs, n.podCIDRsFrom, err = pickCIDRs("clusterCIDR", cfg.ClusterCIDR, cluster.PodSubnets, "podSubnet", cfg, cluster); err != nil {
		return networking{}, err
	}
	n.dnsDomain = cluster.DNSDomain
	if n.dnsDomain != "" {
		n.dnsDomainFrom = kubeadmOrigin(cluster.Sources, "dnsDomain")
	} else {
		n.dnsDomainFrom = "unknown: " + kubeadmMissing(cfg, cluster.Sources, "dnsDomain")
	}
	return n, nil
}

func pickCIDRs(key string, fromConfig []string, fromKubeadm []netip.Prefix, kubeadmField string, cfg *config.Config, cluster *kubeadm.Cluster) ([]netip.Prefix, string, error) {
	if len(fromConfig) > 0 {
		out := make([]netip.Prefix, 0, len(fromConfig))
		for _, s := range fromConfig {
			p, err := netip.ParsePrefix(strings.TrimSpace(s))
			if err != nil {
				return nil, "", fmt.Errorf("%s: %q is not a CIDR", key, s)
			}
			out = append(out, p.Masked())
		}
		return out, "kpr config " + key, nil
	}
	if len(fromKubeadm) > 0 {
		return fromKubeadm, kubeadmOrigin(cluster.Sources, kubeadmField), nil
	}
	return nil, fmt.Sprintf("none: %s not set in kpr's config and %s", key, kubeadmMissing(cfg, cluster.Sources, kubeadmField)), nil
}

// kubeadmOrigin finds where kubeadm.Discover took field from ("<field> <value> from <origin>").
func kubeadmOrigin(sources []string, field string) string {
	for _, s := range sources {
		if rest, ok := strings.CutPrefix(s, field+" "); ok {
			if _, from, ok := strings.Cut(rest, " from "); ok {
				return from
			}
		}
	}
	return "the kubeadm config"
}

// kubeadmMissing says why the kubeadm files gave no value for field.
func kubeadmMissing(cfg *config.Config, sources []string, field string) string {
	if cfg.KubeadmConfig == "" {
		return "no kubeadmConfig is given"
	}
	for _, s := range sources {
		for _, prefix := range []string{field + " unknown: ", "service and pod subnets unknown: "} {
			if why, ok := strings.CutPrefix(s, prefix); ok {
				return why
			}
		}
	}
	return fmt.Sprintf("%s names no %s", cfg.KubeadmConfig, field)
}

// status is n for the status file.
func (n networking) status() *Networking {
	str := func(ps []netip.Prefix) []string {
		out := make([]string, len(ps))
		for i, p := range ps {
			out[i] = p.String()
		}
		return out
	}
	return &Networking{
		ServiceCIDRs:     str(n.serviceCIDRs),
		ServiceCIDRsFrom: n.serviceCIDRsFrom,
		PodCIDRs:         str(n.podCIDRs),
		PodCIDRsFrom:     n.podCIDRsFrom,
		DNSDomain:        n.dnsDomain,
		DNSDomainFrom:    n.dnsDomainFrom,
	}
}
