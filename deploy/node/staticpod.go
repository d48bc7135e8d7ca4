package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"strings"
)

// The static-pod recipe (kubeadm's stacked etcd): the kubelet runs etcd while etcd.yaml is in the
// manifests directory. Stopping moves it (and kube-apiserver.yaml, for a restore) into a holding
// directory; starting moves it back.

const (
	etcdManifest      = "etcd.yaml"
	apiserverManifest = "kube-apiserver.yaml"
	templateLimit     = 1 << 20
)

type staticPod struct{ cfg *Config }

func (s *staticPod) live(name string) string { return filepath.Join(s.cfg.ManifestsDir, name) }
func (s *staticPod) held(name string) string { return filepath.Join(s.cfg.HoldingDir, name) }

// locate says where a manifest is: present (the kubelet runs it), held, or absent.
func (s *staticPod) locate(name string) (string, string, []byte, error) {
	read := func(p string) ([]byte, bool, error) {
		b, err := os.ReadFile(p)
		if errors.Is(err, fs.ErrNotExist) {
			return nil, false, nil
		}
		if err != nil {
			return nil, false, fail("failed", "cannot read %s: %v", p, err)
		}
		return b, true, nil
	}
	lb, lok, err := read(s.live(name))
	if err != nil {
		return "", "", nil, err
	}
	hb, hok, err := read(s.held(name))
	if err != nil {
		return "", "", nil, err
	}
	switch {
	case lok && hok && !bytes.Equal(lb, hb):
		return "", "", nil, fail("precondition", "both %s and %s exist and differ: decide which one is right "+
			"and remove the other", s.live(name), s.held(name))
	case lok:
		return "present", s.live(name), lb, nil
	case hok:
		return "held", s.held(name), hb, nil
	}
	return "absent", "", nil, nil
}

func (s *staticPod) manifest() (string, string, *Manifest, error) {
	where, path, raw, err := s.locate(etcdManifest)
	if err != nil || where == "absent" {
		return where, path, nil, err
	}
	m, err := ParseManifest(raw)
	if err != nil {
		return where, path, nil, fail("precondition", "%s %v", path, err)
	}
	return where, path, m, nil
}

func (s *staticPod) Describe(req *Request, ans *Answer) error {
	where, path, m, err := s.manifest()
	if err != nil {
		return err
	}
	apiWhere, _, _, err := s.locate(apiserverManifest)
	if err != nil {
		return err
	}
	ans.Manifest, ans.ManifestPath, ans.APIServer = where, path, apiWhere
	answering := false
	if m != nil {
		probe := probeFor(m.Param)
		answering = probe.Answering()
		ans.ProbeURL, ans.MemberName, ans.DataDir = probe.URL, m.Param("name"), m.DataDir()
		ans.PID = findProcess(m.ContainerDataDir())
		if req.ShowManifest {
			ans.ManifestText = string(m.raw)
		}
	}
	ans.Answering = &answering
	ans.State = stateWord(where == "present", answering)
	return nil
}

func (s *staticPod) Stop(req *Request, ans *Answer) (bool, error) {
	where, _, m, err := s.manifest()
	if err != nil {
		return false, err
	}
	if m != nil {
		if err := checkName(req, m.Param("name")); err != nil {
			return false, err
		}
	}
	changed := false
	var done []string
	if req.WithAPIServer { // the apiserver first: it must not write to the member being stopped
		apiWhere, _, _, err := s.locate(apiserverManifest)
		if err != nil {
			return false, err
		}
		if apiWhere == "present" {
			if err := moveFile(s.live(apiserverManifest), s.held(apiserverManifest)); err != nil {
				return false, err
			}
			changed = true
			done = append(done, "moved kube-apiserver.yaml to "+s.cfg.HoldingDir)
		}
		if req.APIServerOnly { // etcd stays: a restore stops every apiserver before any member
			if apiWhere == "absent" {
				done = append(done, "no kube-apiserver.yaml on this host")
			} else if !changed {
				done = append(done, "kube-apiserver.yaml was already in "+s.cfg.HoldingDir)
			}
			ans.Detail = strings.Join(done, "; ")
			return changed, nil
		}
	}
	if where == "present" {
		if err := moveFile(s.live(etcdManifest), s.held(etcdManifest)); err != nil {
			return changed, err
		}
		changed = true
		done = append(done, "moved etcd.yaml to "+s.cfg.HoldingDir)
	}
	if m == nil {
		ans.Detail = strings.Join(append(done, "no etcd manifest on this host"), "; ")
		return changed, nil
	}
	took, err := waitGone(probeFor(m.Param), m.ContainerDataDir(), req.Timeout)
	if err != nil {
		return changed, err
	}
	ans.Detail = strings.Join(append(done, "the member stopped answering after "+took), "; ")
	return changed, nil
}

func (s *staticPod) Start(req *Request, stdin io.Reader, ans *Answer) (bool, error) {
	where, _, m, err := s.manifest()
	if err != nil {
		return false, err
	}
	changed := false
	var done []string
	switch {
	case m != nil:
		if err := checkName(req, m.Param("name")); err != nil {
			return false, err
		}
	case !req.Join:
		return false, fail("precondition", "no etcd.yaml in %s or %s: nothing to start (a new member needs --join)",
			s.cfg.ManifestsDir, s.cfg.HoldingDir)
	case !req.TemplateStdin:
		return false, fail("precondition", "no etcd.yaml on this host: a new member's manifest is derived from a "+
			"surviving member's, given on stdin with --template-stdin")
	default:
		raw, err := readLimited(stdin, templateLimit, "the template manifest on stdin")
		if err != nil {
			return false, err
		}
		out, derived, err := deriveManifest(raw, req, "existing")
		if err != nil {
			return false, err
		}
		if hasMemberData(derived.DataDir()) {
			return false, fail("precondition", "data dir %s already holds member data: move it aside before a new "+
				"member joins there", derived.DataDir())
		}
		if err := ensureDir(s.cfg.HoldingDir); err != nil {
			return false, err
		}
		if err := writeAtomic(s.held(etcdManifest), out, 0o600); err != nil {
			return false, err
		}
		where, m, changed = "held", derived, true
		done = append(done, fmt.Sprintf("derived etcd.yaml for %s from %s's", req.Member, derivedFrom(raw)))
	}
	if where == "held" {
		if err := refuseEmptyStart(req, m.DataDir()); err != nil {
			return changed, err
		}
		if err := moveFile(s.held(etcdManifest), s.live(etcdManifest)); err != nil {
			return changed, err
		}
		changed = true
		done = append(done, "moved etcd.yaml into "+s.cfg.ManifestsDir)
	}
	took, err := waitAnswering(probeFor(m.Param), req.Timeout, nil)
	if err != nil {
		return changed, err
	}
	done = append(done, "the member answers after "+took)
	if req.APIServer {
		apiWhere, _, _, err := s.locate(apiserverManifest)
		if err != nil {
			return changed, err
		}
		switch apiWhere {
		case "held":
			if err := moveFile(s.held(apiserverManifest), s.live(apiserverManifest)); err != nil {
				return changed, err
			}
			changed = true
			done = append(done, "moved kube-apiserver.yaml back into "+s.cfg.ManifestsDir)
		case "absent":
			done = append(done, "no kube-apiserver.yaml on this host")
		}
	}
	ans.Detail = strings.Join(done, "; ")
	return changed, nil
}

func derivedFrom(raw []byte) string {
	if m, err := ParseManifest(raw); err == nil {
		return m.Param("name")
	}
	return "the template"
}

func (s *staticPod) Current(req *Request, stdin io.Reader) (Member, error) {
	where, path, m, err := s.manifest()
	if err != nil {
		return Member{}, err
	}
	if where == "present" {
		return Member{}, fail("precondition", "etcd.yaml is in %s, so the kubelet runs the member: stop it first",
			s.cfg.ManifestsDir)
	}
	if m == nil {
		if !req.TemplateStdin {
			return Member{}, fail("precondition", "no etcd.yaml in %s or %s: on a new host pass a surviving "+
				"member's manifest with --template-stdin", s.cfg.ManifestsDir, s.cfg.HoldingDir)
		}
		if len(req.ClientURLs) == 0 {
			return Member{}, badInput("restore --template-stdin needs --client-url (the new host's client URL)")
		}
		raw, err := readLimited(stdin, templateLimit, "the template manifest on stdin")
		if err != nil {
			return Member{}, err
		}
		out, derived, err := deriveManifest(raw, req, "new")
		if err != nil {
			return Member{}, err
		}
		if err := ensureDir(s.cfg.HoldingDir); err != nil {
			return Member{}, err
		}
		if err := writeAtomic(s.held(etcdManifest), out, 0o600); err != nil {
			return Member{}, err
		}
		m, path = derived, s.held(etcdManifest)
	}
	if err := checkName(req, m.Param("name")); err != nil {
		return Member{}, err
	}
	if m.Param("wal-dir") != "" {
		return Member{}, fail("not_supported", "%s sets --wal-dir: the restore does not place a separate WAL "+
			"directory; restore this member by hand", path)
	}
	return Member{Name: m.Param("name"), DataDir: m.DataDir(), Params: m.Param}, nil
}

func (s *staticPod) Switch(req *Request, member Member, dataDir string) (bool, error) {
	where, path, m, err := s.manifest()
	if err != nil {
		return false, err
	}
	if where != "held" {
		return false, fail("precondition", "etcd.yaml is not in the holding dir %s (it is %s)", s.cfg.HoldingDir, where)
	}
	changes, err := m.dataDirChanges(dataDir)
	if err != nil {
		return false, fail("precondition", "%s %v", path, err)
	}
	clients := req.ClientURLs
	if len(clients) == 0 {
		clients = splitList(m.Param("advertise-client-urls"))
	}
	if req.Member != m.Param("name") || req.PeerURL != m.Param("initial-advertise-peer-urls") ||
		strings.Join(clients, ",") != m.Param("advertise-client-urls") {
		more, err := m.memberChanges(req.Member, req.PeerURL, clients, req.InitialCluster, "new")
		if err != nil {
			return false, fail("precondition", "%s %v", path, err)
		}
		changes = append(changes, more...)
	}
	if len(changes) == 0 {
		return false, nil
	}
	info, err := os.Stat(path)
	if err != nil {
		return false, fail("failed", "cannot stat %s: %v", path, err)
	}
	out, err := m.apply(changes)
	if err != nil {
		return false, fail("precondition", "%s: %v", path, err)
	}
	return true, writeAtomic(path, out, info.Mode().Perm())
}

// deriveManifest turns a surviving member's etcd.yaml into the manifest of the requested member:
// its name, URLs, --initial-cluster and --initial-cluster-state (and its data dir when given);
// everything else (image, certificates, probes, resources) as the survivor has it.
func deriveManifest(raw []byte, req *Request, state string) ([]byte, *Manifest, error) {
	m, err := ParseManifest(raw)
	if err != nil {
		return nil, nil, badInput("the template manifest on stdin %v", err)
	}
	survivor := m.Param("name")
	if survivor == "" || survivor == req.Member {
		return nil, nil, badInput("the template manifest must be another member's (it names %q)", survivor)
	}
	old := append(splitList(m.Param("initial-advertise-peer-urls")), splitList(m.Param("advertise-client-urls"))...)
	changes, err := m.memberChanges(req.Member, req.PeerURL, req.ClientURLs, req.InitialCluster, state)
	if err != nil {
		return nil, nil, badInput("the template manifest: %v", err)
	}
	if req.DataDir != "" {
		more, err := m.dataDirChanges(req.DataDir)
		if err != nil {
			return nil, nil, badInput("the template manifest: %v", err)
		}
		changes = append(changes, more...)
	}
	out, err := m.apply(changes)
	if err != nil {
		return nil, nil, fail("precondition", "deriving from %s's manifest: %v", survivor, err)
	}
	// the survivor's address belongs in --initial-cluster, and nowhere else
	rest := bytes.Replace(out, []byte("--initial-cluster="+req.InitialCluster), nil, 1)
	for _, u := range old {
		if where := mentionsAddress(rest, u); where != "" {
			return nil, nil, fail("precondition", "the manifest derived from %s's still names its address %s: "+
				"edit that line of the survivor's manifest by hand first", survivor, where)
		}
	}
	derived, err := ParseManifest(out)
	if err != nil {
		return nil, nil, fail("failed", "the derived manifest %v", err)
	}
	return out, derived, nil
}

// mentionsAddress finds the survivor's address in the derived manifest: its host (its host:port
// when the host is loopback, as in single-machine tests where every member shares it).
func mentionsAddress(text []byte, rawURL string) string {
	u, err := url.Parse(rawURL)
	if err != nil {
		return ""
	}
	needle := u.Hostname()
	if _, loopback := local(rawURL); loopback {
		needle = u.Host
	}
	if needle == "" {
		return ""
	}
	s := string(text)
	for i := strings.Index(s, needle); i >= 0; {
		before, after := byte(' '), byte(' ')
		if i > 0 {
			before = s[i-1]
		}
		if j := i + len(needle); j < len(s) {
			after = s[j]
		}
		if !wordByte(before) && before != '.' && !wordByte(after) && !(after == '.' && nextIsDigit(s, i+len(needle))) {
			return needle
		}
		next := strings.Index(s[i+1:], needle)
		if next < 0 {
			break
		}
		i += 1 + next
	}
	return ""
}

func wordByte(b byte) bool {
	return b >= '0' && b <= '9' || b >= 'a' && b <= 'z' || b >= 'A' && b <= 'Z' || b == '-'
}

func nextIsDigit(s string, dot int) bool {
	return dot+1 < len(s) && s[dot+1] >= '0' && s[dot+1] <= '9'
}
