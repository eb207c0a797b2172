package kubeadm

import (
	"fmt"
	"strings"
	"testing"
)

func TestParseEndpoints(t *testing.T) {
	tests := []struct {
		parse  func(string) (endpoint, error)
		kind   string
		in     string
		want   string // URL, or "" when an error containing errHas is expected
		errHas string
	}{
		// kubeadm host[:port] fields; the default port here is 7443 to show it is used.
		{hostPort7443, "hostport", "198.18.0.1", "https://198.18.0.1:7443", ""},
		{hostPort7443, "hostport", "198.18.0.1:6443", "https://198.18.0.1:6443", ""},
		{hostPort7443, "hostport", "[198.18.0.1]:6443", "https://198.18.0.1:6443", ""},
		{hostPort7443, "hostport", "fd6b:7072::1", "https://[fd6b:7072::1]:7443", ""},
		{hostPort7443, "hostport", "[fd6b:7072:0:0::1]", "https://[fd6b:7072::1]:7443", ""},
		{hostPort7443, "hostport", "[fd6b:7072::1]:6443", "https://[fd6b:7072::1]:6443", ""},
		{hostPort7443, "hostport", "CP.Kpr.Test", "https://cp.kpr.test:7443", ""},
		{hostPort7443, "hostport", "cp.kpr.test:6443", "https://cp.kpr.test:6443", ""},
		{hostPort7443, "hostport", "", "", "empty"},
		{hostPort7443, "hostport", "cp.kpr.test:65536", "", `port "65536"`},
		{hostPort7443, "hostport", "cp.kpr.test:", "", `port ""`},
		{hostPort7443, "hostport", "[198.18.0.1]", "", "brackets must enclose an IPv6 address"},
		{hostPort7443, "hostport", "[fd6b:7072::1]:6443:1", "", "not host or host:port"},
		{hostPort7443, "hostport", "cp kpr", "", "neither an IP address nor a DNS name"},
		{hostPort7443, "hostport", "https://cp.kpr.test", "", "not a URL"},

		// kubeconfig servers
		{parseServerURL, "url", "https://198.18.0.1:6443", "https://198.18.0.1:6443", ""},
		{parseServerURL, "url", "https://198.18.0.1", "https://198.18.0.1:443", ""},
		{parseServerURL, "url", "https://[fd6b:7072::1]:6443/", "https://[fd6b:7072::1]:6443", ""},
		{parseServerURL, "url", "https://fd6b:7072::1:6443", "", "is not a URL"},
		{parseServerURL, "url", "http://198.18.0.1:8080", "", "scheme must be https"},
		{parseServerURL, "url", "https://198.18.0.1:6443/k8s", "", "without path"},
		{parseServerURL, "url", "https://198.18.0.1:0", "", `port "0"`},

		// APIServers entries: either form
		{parseAPIServer, "apiserver", "198.18.0.1", "https://198.18.0.1:6443", ""},
		{parseAPIServer, "apiserver", "https://198.18.0.1", "https://198.18.0.1:443", ""},
		{parseAPIServer, "apiserver", "[fd6b:7072::1]:443", "https://[fd6b:7072::1]:443", ""},
	}
	for _, tt := range tests {
		t.Run(tt.kind+" "+tt.in, func(t *testing.T) {
			e, err := tt.parse(tt.in)
			if tt.want == "" {
				if err == nil || !strings.Contains(err.Error(), tt.errHas) {
					t.Errorf("got %s, %v; want an error containing %q", e.url(), err, tt.errHas)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if e.url() != tt.want {
				t.Errorf("got %s, want %s", e.url(), tt.want)
			}
		})
	}
}

func hostPort7443(s string) (endpoint, error) { return parseHostPort(s, 7443) }

func TestParseSubnets(t *testing.T) {
	tests := []struct {
		in     string
		want   string
		errHas string
	}{
		{"10.96.0.0/12", "[10.96.0.0/12]", ""},
		{"10.96.0.0/16, fd6b:7072:96::/112", "[10.96.0.0/16 fd6b:7072:96::/112]", ""},
		{"10.96.0.1/16", "[10.96.0.0/16]", ""}, // host bits masked
		{"10.96.0.0/16,", "", `"" is not a CIDR`},
		{"10.96.0.0", "", `"10.96.0.0" is not a CIDR`},
		{"fd6b::/64,fd6c::/64", "", "one IPv4 and one IPv6"},
		{"10.96.0.0/16,fd6b::/112,10.97.0.0/16", "", "at most two"},
	}
	for _, tt := range tests {
		got, err := parseSubnets(tt.in)
		if tt.errHas != "" {
			if err == nil || !strings.Contains(err.Error(), tt.errHas) {
				t.Errorf("parseSubnets(%q) = %v, %v; want error containing %q", tt.in, got, err, tt.errHas)
			}
			continue
		}
		if err != nil || fmt.Sprint(got) != tt.want {
			t.Errorf("parseSubnets(%q) = %v, %v; want %s", tt.in, got, err, tt.want)
		}
	}
}
