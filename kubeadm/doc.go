// Package kubeadm finds the API server and the cluster's networking settings from a node's
// kubeadm files, without relying on any Service.
//
// kpr replaces kube-proxy, so until kpr has programmed the datapath the `kubernetes` ClusterIP
// does not work, and kpr must never depend on it (nor on the in-cluster config, which points at
// it). Instead Discover reads what kubeadm leaves on every node:
//
//   - an optional kubeadm config file (InitConfiguration, ClusterConfiguration,
//     JoinConfiguration; v1beta3 or v1beta4), decoded strictly with kubeadm's own API types,
//     scheme, defaulting and conversion, for the API server endpoint and the Service and Pod
//     subnets;
//   - /etc/kubernetes/kubelet.conf (or an explicit kubeconfig) for one more endpoint, the cluster
//     CA and the node's client credentials.
//
// The resulting rest.Config dials the endpoints in failover order itself; see Cluster.RESTConfig.
package kubeadm
