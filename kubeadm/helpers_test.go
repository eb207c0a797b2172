package kubeadm

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// testPKI is a throwaway cluster CA and a kubelet client certificate signed by it.
type testPKI struct {
	caCert   *x509.Certificate
	caPEM    []byte
	certPEM  []byte // client certificate, CN system:node:<name>
	keyPEM   []byte
	nodeName string
}

func newTestPKI(t *testing.T, nodeName string) *testPKI {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "kubernetes"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatal(err)
	}

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "system:node:" + nodeName, Organization: []string{"system:nodes"}},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return &testPKI{
		caCert:   caCert,
		caPEM:    pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}),
		certPEM:  pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		keyPEM:   pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}),
		nodeName: nodeName,
	}
}

func certPEM(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}

// kubeletConf describes a kubeconfig laid out the way kubeadm writes kubelet.conf.
type kubeletConf struct {
	server string
	// Either embedded data...
	caData, certData, keyData []byte
	// ...or file references, relative to the kubeconfig's directory or absolute.
	caFile, certFile, keyFile string
	extraCluster              string // more lines under cluster:, e.g. proxy-url
}

func (k kubeletConf) render() string {
	var cl, us strings.Builder
	if k.caData != nil {
		fmt.Fprintf(&cl, "    certificate-authority-data: %s\n", base64.StdEncoding.EncodeToString(k.caData))
	}
	if k.caFile != "" {
		fmt.Fprintf(&cl, "    certificate-authority: %s\n", k.caFile)
	}
	cl.WriteString(k.extraCluster)
	if k.certData != nil {
		fmt.Fprintf(&us, "    client-certificate-data: %s\n", base64.StdEncoding.EncodeToString(k.certData))
		fmt.Fprintf(&us, "    client-key-data: %s\n", base64.StdEncoding.EncodeToString(k.keyData))
	}
	if k.certFile != "" {
		fmt.Fprintf(&us, "    client-certificate: %s\n    client-key: %s\n", k.certFile, k.keyFile)
	}
	return fmt.Sprintf(`apiVersion: v1
clusters:
- cluster:
%s    server: %s
  name: default-cluster
contexts:
- context:
    cluster: default-cluster
    namespace: default
    user: default-auth
  name: default-context
current-context: default-context
kind: Config
preferences: {}
users:
- name: default-auth
  user:
%s`, cl.String(), k.server, us.String())
}

// embedded is a kubelet.conf with the CA and client credentials inline.
func (p *testPKI) embedded(server string) kubeletConf {
	return kubeletConf{server: server, caData: p.caPEM, certData: p.certPEM, keyData: p.keyPEM}
}

func writeFile(t *testing.T, path string, data []byte) string {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func writeKubeconfig(t *testing.T, dir string, k kubeletConf) string {
	t.Helper()
	return writeFile(t, filepath.Join(dir, "kubelet.conf"), []byte(k.render()))
}
