// Package healthcheck serves the healthCheckNodePort of Services with
// externalTrafficPolicy: Local, so that an external load balancer sends a
// Service's traffic only to nodes that have a ready endpoint of it (kpr drops
// such traffic on other nodes instead of forwarding it, to keep the client's
// source address).
//
// Load balancers and cloud controllers already probe these ports on nodes run
// by kube-proxy, so the answers are kube-proxy's, byte for byte
// (pkg/proxy/healthcheck/service_health.go, v1.36): every method and every path
// on the port gets the same answer, 200 if the Service has local endpoints and
// the proxy is healthy and 503 otherwise, with the headers
//
//	Content-Type: application/json
//	X-Content-Type-Options: nosniff
//	X-Load-Balancing-Endpoint-Weight: <local endpoints>
//
// and this body (tab-indented, no final newline):
//
//	{
//		"service": {
//			"namespace": "default",
//			"name": "web"
//		},
//		"localEndpoints": 2,
//		"serviceProxyHealthy": true
//	}
//
// Where kpr differs from kube-proxy it is in how ports are managed, not in what
// they answer:
//
//   - Listeners belong to ports, not to Services. A count change, or a port
//     passing from a removed Service to a new one in the same Sync, keeps the
//     socket and its kept-alive connections; only the answer changes.
//   - A port is served on each listen address where it could be opened.
//     kube-proxy closes a Service's port on every address when one of them
//     fails, which would make a load balancer probing a good address drain the
//     node for a local conflict elsewhere. The failed addresses are retried by
//     the next Sync or SetAddrs.
//   - Listen failures are returned (naming the Service and
//     spec.healthCheckNodePort) instead of being logged and recorded as a
//     FailedToStartServiceHealthcheck event; the caller decides which.
//   - With no listen addresses given, a port is opened once on all addresses
//     of both families (":port"); kube-proxy opens it per IP family.
//   - Listen addresses can change at run time (SetAddrs); kube-proxy fixes
//     them at start.
//   - Request headers must arrive within ReadHeaderTimeout, so idle half-open
//     probes cannot pile up; kept-alive connections between requests are not
//     limited, as in kube-proxy.
package healthcheck
