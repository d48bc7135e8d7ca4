package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Params is what etcd is told, by flag name without the dashes ("data-dir"): read from the
// manifest's container command, or from the unit's ExecStart and ETCD_* environment.
type Params func(name string) string

const probeTimeout = time.Second

// Probe is how to ask the member whether it answers: its metrics URL when it has one (that
// listener answers as soon as the process runs, with or without quorum), else its client URL
// (which answers only once the member has joined its cluster).
type Probe struct {
	URL string
	TLS *tls.Config
}

func probeFor(p Params) Probe {
	for _, u := range splitList(p("listen-metrics-urls")) {
		if pu, ok := local(u); ok {
			return Probe{URL: pu + "/health", TLS: clientTLS(p, pu)}
		}
	}
	candidates := splitList(p("listen-client-urls"))
	for _, u := range candidates {
		if pu, ok := local(u); ok {
			return Probe{URL: pu + "/version", TLS: clientTLS(p, pu)}
		}
	}
	if all := append(splitList(p("advertise-client-urls")), candidates...); len(all) > 0 {
		return Probe{URL: strings.TrimSuffix(all[0], "/") + "/version", TLS: clientTLS(p, all[0])}
	}
	return Probe{}
}

func splitList(s string) []string {
	var out []string
	for _, part := range strings.Split(s, ",") {
		if part = strings.TrimSpace(part); part != "" {
			out = append(out, part)
		}
	}
	return out
}

// local turns a listen URL into one to call on this host: loopback as is, a wildcard as loopback.
func local(raw string) (string, bool) {
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" {
		return "", false
	}
	host := u.Hostname()
	switch {
	case host == "0.0.0.0" || host == "::" || host == "":
		host = "127.0.0.1"
	case host == "localhost":
	default:
		ip := net.ParseIP(host)
		if ip == nil || !ip.IsLoopback() {
			return "", false
		}
	}
	return u.Scheme + "://" + net.JoinHostPort(host, u.Port()), true
}

// clientTLS: for an https URL, trust the member's CA and present its certificate (kubeadm's etcd
// server certificate is also a client certificate; --client-cert-auth asks for one).
func clientTLS(p Params, raw string) *tls.Config {
	if !strings.HasPrefix(raw, "https://") {
		return nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if ca := p("trusted-ca-file"); ca != "" {
		if pem, err := os.ReadFile(ca); err == nil {
			pool := x509.NewCertPool()
			pool.AppendCertsFromPEM(pem)
			cfg.RootCAs = pool
		}
	}
	if cert, key := p("cert-file"), p("key-file"); cert != "" && key != "" {
		if pair, err := tls.LoadX509KeyPair(cert, key); err == nil {
			cfg.Certificates = []tls.Certificate{pair}
		}
	}
	return cfg
}

// Answering: any HTTP answer within the deadline (a refused connection costs nothing).
func (pr Probe) Answering() bool {
	if pr.URL == "" {
		return false
	}
	client := &http.Client{Timeout: probeTimeout, Transport: &http.Transport{TLSClientConfig: pr.TLS,
		DisableKeepAlives: true, Proxy: nil}}
	resp, err := client.Get(pr.URL)
	if err != nil {
		return false
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 4096))
	resp.Body.Close()
	return true
}

// findProcess returns the pid of an etcd process running on dataDir (by its --data-dir flag or
// its ETCD_DATA_DIR), or 0. A static pod's etcd shows in the host's /proc like any process.
func findProcess(dataDir string) int {
	if dataDir == "" {
		return 0
	}
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || len(cmdline) == 0 {
			continue
		}
		argv := strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00")
		if filepath.Base(argv[0]) != "etcd" || zombie(e.Name()) {
			continue
		}
		if argDataDir(argv) == dataDir || envDataDir(e.Name()) == dataDir {
			return pid
		}
	}
	return 0
}

func zombie(pid string) bool {
	stat, err := os.ReadFile(filepath.Join("/proc", pid, "stat"))
	if err != nil {
		return true
	}
	fields := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+1:]))
	return len(fields) == 0 || fields[0] == "Z" || fields[0] == "X"
}

func argDataDir(argv []string) string {
	for i, a := range argv {
		if v, ok := strings.CutPrefix(a, "--data-dir="); ok {
			return filepath.Clean(v)
		}
		if a == "--data-dir" && i+1 < len(argv) {
			return filepath.Clean(argv[i+1])
		}
	}
	return ""
}

func envDataDir(pid string) string {
	environ, err := os.ReadFile(filepath.Join("/proc", pid, "environ"))
	if err != nil {
		return ""
	}
	for _, kv := range strings.Split(string(environ), "\x00") {
		if v, ok := strings.CutPrefix(kv, "ETCD_DATA_DIR="); ok {
			return filepath.Clean(v)
		}
	}
	return ""
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(deadline time.Time, cond func() (bool, error)) (bool, error) {
	for {
		ok, err := cond()
		if ok || err != nil {
			return ok, err
		}
		if time.Now().After(deadline) {
			return false, nil
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// runTool runs a program (never through a shell) with a deadline; it returns stdout, and an error
// that carries the last line of stderr.
func runTool(timeout time.Duration, argv []string, stdin io.Reader) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	path, err := exec.LookPath(argv[0])
	if err != nil {
		return "", fail("failed", "%s not found: %v", argv[0], err)
	}
	cmd := exec.CommandContext(ctx, path, argv[1:]...)
	cmd.Stdin = stdin
	cmd.Env = toolEnv()
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err = cmd.Run()
	if ctx.Err() != nil {
		return stdout.String(), fail("timeout", "%s %s did not finish within %s", filepath.Base(argv[0]),
			strings.Join(argv[1:2], ""), timeout)
	}
	if err != nil {
		last := lastLine(stderr.String())
		if last == "" {
			last = lastLine(stdout.String())
		}
		return stdout.String(), fail("failed", "%s %s: %v: %s", filepath.Base(argv[0]), strings.Join(argv[1:2], ""),
			err, last)
	}
	return stdout.String(), nil
}

// toolEnv: a fixed, small environment for the programs the node runs (nothing of the SSH session).
func toolEnv() []string {
	path := os.Getenv("PATH")
	if path == "" {
		path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	}
	return []string{"PATH=" + path, "LC_ALL=C"}
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}
