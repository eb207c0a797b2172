// Package sandbox builds the end-to-end test cluster for kpr: a real etcd and a real
// kube-apiserver in a control-plane network namespace, network namespaces as nodes, and network
// namespaces as pods. Nothing runs a container; pods are addresses plus the processes a test
// starts in them.
//
// # Topology (addressing from docs/ARCHITECTURE.md)
//
//	<prefix>-cp          bridge br0 198.18.0.1/24 fd6b:7072::1/64, etcd 127.0.0.1:2379,
//	                     kube-apiserver [::]:6443 (advertised as 198.18.0.1).
//	                     ip_forward and IPv6 forwarding are 0: a packet addressed to a Service
//	                     VIP that nobody translated reaches the default route and dies here.
//	<prefix>-<node>      eth0 198.18.0.(10+i)/24 fd6b:7072::(10+i)/64 (bridged to br0),
//	                     default routes via the control plane, forwarding on, a route to every
//	                     other node's pod CIDRs via that node (host-gw style, over the bridge).
//	<prefix>-<node>-<s>  eth0 10.244.i.s/32 fd6b:7072:244:i::s/128, default via 169.254.1.1
//	                     (onlink) and fe80::1, which the node side p<i>s<s> of the veth holds.
//	<prefix>-<host>      an external host (ControlPlane.AddExternalHost): eth0 198.18.0.(200+i)/24
//	                     fd6b:7072::(200+i)/64 (bridged to br0), forwarding off, no default
//	                     route; Host.RouteVia routes a prefix (an external or load-balancer IP)
//	                     via a node.
//
// IPv6 numbers follow the documented mnemonic: the decimal digits are written as hex text, so
// node 11 is fd6b:7072::11 and pod slot 12 on node 3 is fd6b:7072:244:3::12.
//
// Every veth is created directly between two sandbox namespaces, so nothing ever appears in the
// root network namespace, and no root-namespace sysctl, route or firewall rule is touched.
//
// # How the test process reaches the API server
//
// The test process lives in the root network namespace, where 198.18.0.1 does not exist. The
// admin client (ControlPlane.Client and ControlPlane.RESTConfig) uses a dialer that opens each
// TCP socket from a locked OS thread that has switched into the control-plane namespace
// (setns(2)), then switches back; a socket keeps the namespace it was created in. Nothing
// listens anywhere for this, there is no helper process to die, and the thread is abandoned
// (left locked, so the Go runtime ends it) if switching back ever fails. The same dialer is
// available for nodes and pods (Node.DialContext, Pod.DialContext, Node.RESTConfig), so a test
// can use a node's own kubelet.conf credentials from inside that node's namespace.
//
// AdminKubeconfig names https://198.18.0.1:6443 and is meant for tools run inside the sandbox,
// e.g. nsenter --net=/run/netns/<prefix>-cp -- kubectl --kubeconfig <WorkDir>/admin.conf get pods.
//
// # etcd 3.4 with kube-apiserver 1.36
//
// The apiserver enables the storage feature RequestWatchProgress only for etcd >= 3.4.31 or
// 3.5.13. Debian's etcd 3.4.23 is older, so ConsistentListFromCache (GA, locked on) falls back
// to reading from etcd, and a watch-list stream (sendInitialEvents=true, WatchList is beta and on
// by default) fails with "required storage feature RequestWatchProgress is disabled". The
// sandbox therefore starts kube-apiserver with --feature-gates=WatchList=false, so client-go's
// reflectors get a plain list+watch. See apiserverFeatureGates.
//
// # Processes
//
// Node.Start, Pod.Start and ControlPlane.Start run a program under nsenter --net (not "ip netns
// exec", which remounts /sys and hides the cgroup and bpf filesystems), as the leader of its own
// process group, with stdout and stderr in WorkDir/logs. StartCmd takes a Cmd with CgroupFD, so
// a process starts inside a cgroup (clone3 CLONE_INTO_CGROUP); ControlPlane.NewCgroup makes one.
// Exec runs short commands the same way. Every process gets Pdeathsig=SIGKILL, so a crashed
// test leaves no daemons; since the kernel ties that to the forking thread, all forks happen on
// one locked OS thread that lives until Close. Close stops processes (SIGTERM, SIGKILL after
// 10s), deletes the namespaces and cgroups it made, and reports any process still found in a
// sandbox namespace. WorkDir is left as is (PKI, etcd-data, etcd.log, kube-apiserver.log,
// admin.conf, nodes/<name>/etc/kubernetes, logs/).
//
// # Things without a kubelet or controller-manager
//
// The ServiceAccount admission plugin is disabled (no token controller) and the sandbox writes
// Node and Pod status itself. Pods get terminationGracePeriodSeconds 0, so deleting one through
// the API is immediate (no kubelet would confirm a graceful deletion). Nothing creates
// EndpointSlices for Services; tests write them.
package sandbox
