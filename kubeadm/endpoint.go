package kubeadm

import (
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"strconv"
	"strings"

	"k8s.io/apimachinery/pkg/util/validation"
)

// defaultAPIServerPort is kubeadm's default localAPIEndpoint.bindPort, used for a host given
// without a port where kubeadm itself would use the bind port.
const defaultAPIServerPort = 6443

// endpoint is one API server address in canonical form: IP literals are normalised (so
// "fd00:0::1" and "fd00::1" deduplicate) and DNS names lower-cased.
type endpoint struct {
	host string
	port uint16
}

// hostPort is what the failover dialer connects to; IPv6 literals are bracketed.
func (e endpoint) hostPort() string {
	return net.JoinHostPort(e.host, strconv.Itoa(int(e.port)))
}

// url is the endpoint as an https URL for rest.Config.Host and Cluster.Endpoints.
func (e endpoint) url() string {
	return (&url.URL{Scheme: "https", Host: e.hostPort()}).String()
}

// parseHostPort parses kubeadm's "host" or "host:port" endpoint fields (controlPlaneEndpoint,
// discovery.bootstrapToken.apiServerEndpoint). A bare IPv6 literal is an address without a port,
// since a port after an IPv6 address needs brackets.
func parseHostPort(s string, defaultPort uint16) (endpoint, error) {
	if s == "" {
		return endpoint{}, fmt.Errorf("empty endpoint")
	}
	if strings.Contains(s, "://") {
		return endpoint{}, fmt.Errorf("%q must be host or host:port, not a URL", s)
	}
	if addr, err := netip.ParseAddr(s); err == nil {
		return endpoint{host: addr.String(), port: defaultPort}, nil
	}
	if inner, ok := strings.CutPrefix(s, "["); ok && strings.HasSuffix(inner, "]") {
		addr, err := netip.ParseAddr(strings.TrimSuffix(inner, "]"))
		if err != nil || !addr.Is6() {
			return endpoint{}, fmt.Errorf("%q: brackets must enclose an IPv6 address", s)
		}
		return endpoint{host: addr.String(), port: defaultPort}, nil
	}
	if !strings.Contains(s, ":") {
		host, err := canonicalHost(s)
		if err != nil {
			return endpoint{}, err
		}
		return endpoint{host: host, port: defaultPort}, nil
	}
	host, portStr, err := net.SplitHostPort(s)
	if err != nil {
		return endpoint{}, fmt.Errorf("%q is not host or host:port (an IPv6 address with a port needs brackets, [addr]:port): %v", s, err)
	}
	port, err := parsePort(portStr)
	if err != nil {
		return endpoint{}, fmt.Errorf("%q: %w", s, err)
	}
	host, err = canonicalHost(host)
	if err != nil {
		return endpoint{}, err
	}
	return endpoint{host: host, port: port}, nil
}

// parseServerURL parses a kubeconfig server or an "https://host[:port]" override. Without a
// port the URL means 443, as it does for client-go.
func parseServerURL(s string) (endpoint, error) {
	u, err := url.Parse(s)
	if err != nil {
		return endpoint{}, fmt.Errorf("%q is not a URL: %v", s, err)
	}
	if u.Scheme != "https" {
		return endpoint{}, fmt.Errorf("%q: scheme must be https (the API server only serves TLS)", s)
	}
	if u.Path != "" && u.Path != "/" || u.RawQuery != "" || u.Fragment != "" || u.User != nil {
		return endpoint{}, fmt.Errorf("%q: only https://host:port is supported, without path, query or user", s)
	}
	port := uint16(443)
	if p := u.Port(); p != "" {
		if port, err = parsePort(p); err != nil {
			return endpoint{}, fmt.Errorf("%q: %w", s, err)
		}
	}
	host, err := canonicalHost(u.Hostname())
	if err != nil {
		return endpoint{}, err
	}
	return endpoint{host: host, port: port}, nil
}

// parseAPIServer parses one Options.APIServers entry: a URL if it has a scheme, else host[:port]
// with kubeadm's default port.
func parseAPIServer(s string) (endpoint, error) {
	if strings.Contains(s, "://") {
		return parseServerURL(s)
	}
	return parseHostPort(s, defaultAPIServerPort)
}

func parsePort(s string) (uint16, error) {
	p, err := strconv.ParseUint(s, 10, 16)
	if err != nil || p == 0 {
		return 0, fmt.Errorf("port %q is not a number between 1 and 65535", s)
	}
	return uint16(p), nil
}

func validPort(p int32) error {
	if p < 1 || p > 65535 {
		return fmt.Errorf("%d is not a port between 1 and 65535", p)
	}
	return nil
}

func canonicalHost(h string) (string, error) {
	if addr, err := netip.ParseAddr(h); err == nil {
		return addr.String(), nil
	}
	lower := strings.ToLower(h)
	if errs := validation.IsDNS1123Subdomain(lower); len(errs) > 0 {
		return "", fmt.Errorf("host %q is neither an IP address nor a DNS name", h)
	}
	return lower, nil
}

// endpointList keeps the failover order and drops later duplicates, saying so in sources.
type endpointList struct {
	eps     []endpoint
	sources []string
}

func (l *endpointList) add(e endpoint, from string) {
	for _, have := range l.eps {
		if have == e {
			l.sources = append(l.sources, fmt.Sprintf("endpoint %s from %s duplicates an earlier endpoint", e.url(), from))
			return
		}
	}
	l.eps = append(l.eps, e)
	l.sources = append(l.sources, fmt.Sprintf("endpoint %s from %s", e.url(), from))
}
