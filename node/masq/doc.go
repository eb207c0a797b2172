// Package masq owns kpr's only netfilter state: one nftables table per address
// family that masquerades pod traffic leaving the cluster.
//
// kpr's Service datapath is eBPF, so nothing here depends on Services: the table
// holds two interval sets (the pod CIDRs and the non-masquerade CIDRs) and a
// fixed list of rules, and Config has no field a Service could change. The rule
// count is the same for 1 and for 10,000 Services (tested). The north-south
// path does its SNAT in eBPF; if it ever needs netfilter, its rules belong here,
// in the same table and the same batch.
//
// For each family with a pod CIDR, Rules builds (table "kpr" by default):
//
//	table ip kpr {
//		set pod-cidrs { type ipv4_addr; flags interval; elements = { 10.244.0.0/16 } }
//		set non-masquerade-cidrs { type ipv4_addr; flags interval; elements = { 10.96.0.0/16, 10.244.0.0/16 } }
//		chain postrouting {
//			type nat hook postrouting priority srcnat; policy accept;
//			ip saddr @pod-cidrs ip daddr != @non-masquerade-cidrs jump masquerading
//		}
//		chain masquerading {
//			meta l4proto tcp th sport >= 1024 masquerade to :32768-60999 fully-random
//			meta l4proto udp th sport >= 1024 masquerade to :32768-60999 fully-random
//			meta l4proto sctp th sport >= 1024 masquerade to :32768-60999 fully-random
//			masquerade fully-random
//		}
//	}
//
// Only packets that leave the node pass a postrouting hook (traffic to a local
// address goes to input), so "pod traffic leaving the cluster" is: source in a
// pod CIDR, destination outside the non-masquerade CIDRs (by default the pod
// and Service CIDRs, filled in by the caller).
//
// # Port range
//
// Masquerade is fully random (as kube-proxy and flannel do) and, for TCP, UDP
// and SCTP from unprivileged source ports, confined to Config.MasqPortRange,
// 32768-60999 by default: the kernel's default ip_local_port_range, which node
// sockets already share with masquerade through conntrack. That leaves
// 61000-65535 to kpr's own eBPF SNAT (SuggestedSNATPortRange): no node socket
// gets those ports as ephemeral ports and masquerade never picks them, so the two
// translations cannot produce the same tuple. Config.ReservedPortRange makes the
// split a checked one. Connections from privileged source ports (below 1024,
// e.g. NFS clients on "secure" ports) and protocols without ports are
// masqueraded without a range: the kernel then keeps a privileged port
// privileged, which cannot collide with the SNAT range either. ICMP echo
// identifiers are chosen by the kernel from the whole identifier space.
//
// # Writing
//
// Manager.Apply writes a Ruleset as one nftables transaction: it deletes kpr's
// tables (creating them first, so the delete cannot fail on a missing table) and
// recreates them with their sets, chains and rules, all in a single netlink batch
// that the kernel commits atomically, so no half-written table is ever visible.
// An Apply that would change nothing sends nothing. Only tables named
// Config.TableName in the ip and ip6 families are ever written or deleted.
//
// The batch is encoded here rather than by nftables.Conn: google/nftables
// (v0.3.0, and upstream master when this was written) drops a masquerade's
// flags when it has a port range (expr.Masq with ToPorts), so "masquerade to
// :a-b fully-random" would lose both fully-random and
// NF_NAT_RANGE_PROTO_SPECIFIED, and the kernel would then ignore the range
// (TestKernelTraffic sees ports outside it). Expressions other than masq are
// still marshalled by google/nftables, and Manager.Current reads the tables
// back with it. TestGoogleNftablesMasqDropsFlags notices when upstream is fixed.
package masq
