package kubeadm

import (
	"fmt"
	"net/netip"
	"strings"

	"k8s.io/apimachinery/pkg/util/validation"
	kubeadmapi "k8s.io/kubernetes/cmd/kubeadm/app/apis/kubeadm"
)

// fileSettings is what a kubeadm config file says about the cluster, validated.
type fileSettings struct {
	serviceSubnets []netip.Prefix
	podSubnets     []netip.Prefix
	dnsDomain      string

	endpoint     *endpoint
	endpointFrom string

	sources []string
}

// settings validates every field Discover uses, whichever one ends up chosen, so a typo in a
// lower-priority field is not silently carried until the day it is needed.
func (f *kubeadmFile) settings() (*fileSettings, error) {
	s := &fileSettings{}
	s.sources = append(s.sources, f.notes...)
	if err := f.networking(s); err != nil {
		return nil, err
	}
	if err := f.apiEndpoint(s); err != nil {
		return nil, err
	}
	return s, nil
}

func (f *kubeadmFile) fieldErr(kind, field string, err error) error {
	return fmt.Errorf("%s: %s %s: %v", f.path, kind, field, err)
}

// origin says where a possibly defaulted ClusterConfiguration value came from.
func (f *kubeadmFile) origin(field string, inFile bool) string {
	switch {
	case f.clusterImplied:
		return fmt.Sprintf("kubeadm default (%s has an InitConfiguration but no ClusterConfiguration)", f.path)
	case inFile:
		return fmt.Sprintf("%s ClusterConfiguration.%s", f.path, field)
	default:
		return fmt.Sprintf("kubeadm default (ClusterConfiguration.%s not set in %s)", field, f.path)
	}
}

func (f *kubeadmFile) networking(s *fileSettings) error {
	if f.cluster == nil {
		s.sources = append(s.sources, fmt.Sprintf(
			"service and pod subnets unknown: %s has no ClusterConfiguration (a joining node gets it from the cluster)", f.path))
		return nil
	}
	n := f.cluster.Networking
	var err error

	if s.serviceSubnets, err = parseSubnets(n.ServiceSubnet); err != nil {
		return f.fieldErr(kindCluster, "networking.serviceSubnet", err)
	}
	s.sources = append(s.sources, fmt.Sprintf("serviceSubnet %s from %s",
		n.ServiceSubnet, f.origin("networking.serviceSubnet", f.inFile(kindCluster, "networking.serviceSubnet"))))

	if n.PodSubnet == "" {
		s.sources = append(s.sources, fmt.Sprintf("podSubnet unknown: ClusterConfiguration.networking.podSubnet not set in %s (kubeadm has no default)", f.path))
	} else {
		if s.podSubnets, err = parseSubnets(n.PodSubnet); err != nil {
			return f.fieldErr(kindCluster, "networking.podSubnet", err)
		}
		s.sources = append(s.sources, fmt.Sprintf("podSubnet %s from %s",
			n.PodSubnet, f.origin("networking.podSubnet", f.inFile(kindCluster, "networking.podSubnet"))))
	}

	if errs := validation.IsDNS1123Subdomain(n.DNSDomain); len(errs) > 0 {
		return f.fieldErr(kindCluster, "networking.dnsDomain", fmt.Errorf("%q is not a DNS domain (lower-case RFC 1123 subdomain)", n.DNSDomain))
	}
	s.dnsDomain = n.DNSDomain
	s.sources = append(s.sources, fmt.Sprintf("dnsDomain %s from %s",
		n.DNSDomain, f.origin("networking.dnsDomain", f.inFile(kindCluster, "networking.dnsDomain"))))
	return nil
}

// parseSubnets parses kubeadm's comma-separated subnet list: one CIDR, or two of different
// families for dual-stack. Host bits are masked, as the API server does with its ranges.
func parseSubnets(list string) ([]netip.Prefix, error) {
	if list == "" {
		return nil, fmt.Errorf("empty")
	}
	var out []netip.Prefix
	for _, part := range strings.Split(list, ",") {
		p, err := netip.ParsePrefix(strings.TrimSpace(part))
		if err != nil {
			return nil, fmt.Errorf("%q is not a CIDR", strings.TrimSpace(part))
		}
		out = append(out, p.Masked())
	}
	switch {
	case len(out) > 2:
		return nil, fmt.Errorf("%q: at most two CIDRs (one IPv4, one IPv6) are allowed", list)
	case len(out) == 2 && out[0].Addr().Is4() == out[1].Addr().Is4():
		return nil, fmt.Errorf("%q: dual-stack needs one IPv4 and one IPv6 CIDR", list)
	}
	return out, nil
}

// localEndpoint validates an APIEndpoint (advertiseAddress, bindPort). ok is false when the
// advertise address is empty: kubeadm then picks the address at run time, which a file cannot
// tell us.
func (f *kubeadmFile) localEndpoint(kind, field string, ep kubeadmapi.APIEndpoint) (e endpoint, ok bool, portNote string, err error) {
	if err := validPort(ep.BindPort); err != nil {
		return endpoint{}, false, "", f.fieldErr(kind, field+".bindPort", err)
	}
	if !f.inFile(kind, field+".bindPort") {
		portNote = fmt.Sprintf(" (port %d is kubeadm's default bindPort)", ep.BindPort)
	}
	if ep.AdvertiseAddress == "" {
		return endpoint{port: uint16(ep.BindPort)}, false, portNote, nil
	}
	addr, perr := netip.ParseAddr(ep.AdvertiseAddress)
	if perr != nil {
		return endpoint{}, false, "", f.fieldErr(kind, field+".advertiseAddress", fmt.Errorf("%q is not an IP address", ep.AdvertiseAddress))
	}
	return endpoint{host: addr.String(), port: uint16(ep.BindPort)}, true, portNote, nil
}

// apiEndpoint picks the file's API server endpoint: controlPlaneEndpoint, else this node's
// localAPIEndpoint, else the endpoint a worker joined through.
func (f *kubeadmFile) apiEndpoint(s *fileSettings) error {
	type candidate struct {
		ep   endpoint
		from string
	}
	var cands []candidate
	// kubeadm fills a port-less controlPlaneEndpoint with this node's bind port.
	bindPort, bindPortFrom := uint16(defaultAPIServerPort), "kubeadm's default API server port"

	if f.init != nil {
		ep, ok, note, err := f.localEndpoint(kindInit, "localAPIEndpoint", f.init.LocalAPIEndpoint)
		if err != nil {
			return err
		}
		bindPort, bindPortFrom = ep.port, "InitConfiguration.localAPIEndpoint.bindPort"
		if ok {
			cands = append(cands, candidate{ep, fmt.Sprintf("%s InitConfiguration.localAPIEndpoint%s", f.path, note)})
			if ep.host == placeholderAdvertiseAddress {
				s.sources = append(s.sources, fmt.Sprintf("warning: %s InitConfiguration.localAPIEndpoint.advertiseAddress %s is the placeholder printed by `kubeadm config print init-defaults`", f.path, ep.host))
			}
		} else {
			s.sources = append(s.sources, fmt.Sprintf("%s InitConfiguration.localAPIEndpoint.advertiseAddress is empty: kubeadm chooses it at run time, not used", f.path))
		}
	}
	if f.join != nil && f.join.ControlPlane != nil {
		ep, ok, note, err := f.localEndpoint(kindJoin, "controlPlane.localAPIEndpoint", f.join.ControlPlane.LocalAPIEndpoint)
		if err != nil {
			return err
		}
		if f.init == nil {
			bindPort, bindPortFrom = ep.port, "JoinConfiguration.controlPlane.localAPIEndpoint.bindPort"
		}
		if ok {
			cands = append(cands, candidate{ep, fmt.Sprintf("%s JoinConfiguration.controlPlane.localAPIEndpoint%s", f.path, note)})
		} else {
			s.sources = append(s.sources, fmt.Sprintf("%s JoinConfiguration.controlPlane.localAPIEndpoint.advertiseAddress is empty: kubeadm chooses it at run time, not used", f.path))
		}
	}
	if f.join != nil && f.join.Discovery.BootstrapToken != nil && f.join.Discovery.BootstrapToken.APIServerEndpoint != "" {
		ep, err := parseHostPort(f.join.Discovery.BootstrapToken.APIServerEndpoint, defaultAPIServerPort)
		if err != nil {
			return f.fieldErr(kindJoin, "discovery.bootstrapToken.apiServerEndpoint", err)
		}
		cands = append(cands, candidate{ep, fmt.Sprintf("%s JoinConfiguration.discovery.bootstrapToken.apiServerEndpoint", f.path)})
	}
	if f.cluster != nil && f.cluster.ControlPlaneEndpoint != "" {
		ep, err := parseHostPort(f.cluster.ControlPlaneEndpoint, bindPort)
		if err != nil {
			return f.fieldErr(kindCluster, "controlPlaneEndpoint", err)
		}
		from := fmt.Sprintf("%s ClusterConfiguration.controlPlaneEndpoint", f.path)
		if !hasPort(f.cluster.ControlPlaneEndpoint) {
			from += fmt.Sprintf(" (port %d from %s)", bindPort, bindPortFrom)
		}
		cands = append([]candidate{{ep, from}}, cands...)
	}
	if len(cands) == 0 {
		s.sources = append(s.sources, fmt.Sprintf("no API server endpoint in %s", f.path))
		return nil
	}
	s.endpoint, s.endpointFrom = &cands[0].ep, cands[0].from
	for _, c := range cands[1:] {
		s.sources = append(s.sources, fmt.Sprintf("endpoint %s from %s not used: %s takes precedence", c.ep.url(), c.from, cands[0].ep.url()))
	}
	return nil
}

// hasPort reports whether a kubeadm host[:port] string carries a port.
func hasPort(s string) bool {
	if _, err := netip.ParseAddr(s); err == nil {
		return false
	}
	if strings.HasPrefix(s, "[") {
		return !strings.HasSuffix(s, "]")
	}
	return strings.Contains(s, ":")
}
