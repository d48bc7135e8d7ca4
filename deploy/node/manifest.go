package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"unicode/utf8"

	"go.yaml.in/yaml/v3"
)

// The static-pod recipe edits etcd.yaml in place: the YAML parser finds the nodes and their
// positions, and only those tokens are rewritten, so every other byte of the manifest (comments,
// order, quoting, kubeadm's layout) stays as it was. The result is parsed again and must equal the
// old manifest with exactly the intended changes.

const dataVolume = "etcd-data"

// Manifest is a parsed static pod manifest for etcd.
type Manifest struct {
	raw         []byte
	doc         *yaml.Node
	command     *yaml.Node // the etcd container's command (a block sequence of strings)
	annotations *yaml.Node // metadata.annotations, or nil
	mountPath   *yaml.Node // the etcd-data volumeMount's mountPath, or nil
	hostPath    *yaml.Node // the etcd-data volume's hostPath.path, or nil
}

func mapGet(m *yaml.Node, key string) *yaml.Node {
	if m == nil || m.Kind != yaml.MappingNode {
		return nil
	}
	for i := 0; i+1 < len(m.Content); i += 2 {
		if m.Content[i].Value == key {
			return m.Content[i+1]
		}
	}
	return nil
}

func itemNamed(seq *yaml.Node, name string) *yaml.Node {
	if seq == nil || seq.Kind != yaml.SequenceNode {
		return nil
	}
	for _, item := range seq.Content {
		if n := mapGet(item, "name"); n != nil && n.Kind == yaml.ScalarNode && n.Value == name {
			return item
		}
	}
	return nil
}

func ParseManifest(raw []byte) (*Manifest, error) {
	dec := yaml.NewDecoder(bytes.NewReader(raw))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		return nil, fmt.Errorf("not valid YAML: %v", err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("holds more than one YAML document")
	}
	if len(doc.Content) != 1 || doc.Content[0].Kind != yaml.MappingNode {
		return nil, fmt.Errorf("is not a mapping")
	}
	pod := doc.Content[0]
	if k := mapGet(pod, "kind"); k == nil || k.Value != "Pod" {
		return nil, fmt.Errorf("is not a Pod")
	}
	spec := mapGet(pod, "spec")
	containers := mapGet(spec, "containers")
	if containers == nil || containers.Kind != yaml.SequenceNode || len(containers.Content) == 0 {
		return nil, fmt.Errorf("has no spec.containers")
	}
	container := itemNamed(containers, "etcd")
	if container == nil {
		if len(containers.Content) != 1 {
			return nil, fmt.Errorf("has no container named etcd")
		}
		container = containers.Content[0]
	}
	command := mapGet(container, "command")
	if command == nil || command.Kind != yaml.SequenceNode || command.Style&yaml.FlowStyle != 0 {
		return nil, fmt.Errorf("has no block-style command list in its etcd container")
	}
	for _, item := range command.Content {
		if item.Kind != yaml.ScalarNode {
			return nil, fmt.Errorf("has a command entry that is not a string (line %d)", item.Line)
		}
	}
	m := &Manifest{raw: raw, doc: &doc, command: command,
		annotations: mapGet(mapGet(pod, "metadata"), "annotations")}
	if mount := itemNamed(mapGet(container, "volumeMounts"), dataVolume); mount != nil {
		m.mountPath = mapGet(mount, "mountPath")
	}
	if vol := itemNamed(mapGet(spec, "volumes"), dataVolume); vol != nil {
		m.hostPath = mapGet(mapGet(vol, "hostPath"), "path")
	}
	return m, nil
}

// flagNode finds the command entry `--name=value`; kubeadm writes every flag that way, so a flag
// given as two entries (or twice) is refused rather than guessed at.
func (m *Manifest) flagNode(name string) (*yaml.Node, error) {
	var found *yaml.Node
	for _, item := range m.command.Content {
		if item.Value == "--"+name {
			return nil, fmt.Errorf("--%s is written as a separate entry; the node program needs --%s=value", name, name)
		}
		if strings.HasPrefix(item.Value, "--"+name+"=") {
			if found != nil {
				return nil, fmt.Errorf("--%s appears twice in the command", name)
			}
			found = item
		}
	}
	return found, nil
}

// Param is the value of an etcd flag in the command ("" when absent).
func (m *Manifest) Param(name string) string {
	n, err := m.flagNode(name)
	if err != nil || n == nil {
		return ""
	}
	return strings.TrimPrefix(n.Value, "--"+name+"=")
}

// DataDir is the member's data directory on the host: the etcd-data volume's hostPath, else --data-dir.
func (m *Manifest) DataDir() string {
	if m.hostPath != nil {
		return m.hostPath.Value
	}
	return m.Param("data-dir")
}

// ContainerDataDir is the data directory as etcd sees it (--data-dir).
func (m *Manifest) ContainerDataDir() string { return m.Param("data-dir") }

// change is one edit: a scalar's new value, or (insert) a new command entry after `node`.
type change struct {
	node   *yaml.Node
	value  string
	insert bool
}

// setFlag sets --name=value; a missing flag is inserted after `after` when that is given.
func (m *Manifest) setFlag(name, value, after string) (*change, error) {
	n, err := m.flagNode(name)
	if err != nil {
		return nil, err
	}
	text := "--" + name + "=" + value
	if n != nil {
		if n.Value == text {
			return nil, nil
		}
		return &change{node: n, value: text}, nil
	}
	if after == "" {
		return nil, fmt.Errorf("the command has no --%s", name)
	}
	anchor, err := m.flagNode(after)
	if err != nil {
		return nil, err
	}
	if anchor == nil {
		return nil, fmt.Errorf("the command has neither --%s nor --%s", name, after)
	}
	return &change{node: anchor, value: text, insert: true}, nil
}

// dataDirChanges points the member at dir: the etcd-data hostPath always; --data-dir and the
// volume's mountPath too when, as kubeadm lays it out, they are the same path as the hostPath
// (otherwise the container keeps seeing its data at the path it knows).
func (m *Manifest) dataDirChanges(dir string) ([]*change, error) {
	container := m.ContainerDataDir()
	if container == "" {
		return nil, fmt.Errorf("the command has no --data-dir")
	}
	if m.hostPath == nil {
		return nil, fmt.Errorf("has no hostPath volume named %s", dataVolume)
	}
	out := []*change{}
	if m.hostPath.Value != dir {
		out = append(out, &change{node: m.hostPath, value: dir})
	}
	if container == m.hostPath.Value && (m.mountPath == nil || m.mountPath.Value == container) {
		c, err := m.setFlag("data-dir", dir, "")
		if err != nil {
			return nil, err
		}
		if c != nil {
			out = append(out, c)
		}
		if m.mountPath != nil && m.mountPath.Value != dir {
			out = append(out, &change{node: m.mountPath, value: dir})
		}
	}
	return out, nil
}

// memberChanges gives the manifest another member's identity: name, peer and client URLs
// (loopback listen URLs kept), --initial-cluster and --initial-cluster-state, and kubeadm's
// advertise-client-urls annotation.
func (m *Manifest) memberChanges(name, peerURL string, clientURLs []string, initialCluster, state string) ([]*change, error) {
	listen := listenClientURLs(m.Param, clientURLs)
	clients := strings.Join(clientURLs, ",")
	wanted := []struct{ flag, value, after string }{
		{"name", name, ""},
		{"initial-advertise-peer-urls", peerURL, ""},
		{"listen-peer-urls", peerURL, ""},
		{"advertise-client-urls", clients, ""},
		{"listen-client-urls", strings.Join(listen, ","), ""},
		{"initial-cluster", initialCluster, ""},
		{"initial-cluster-state", state, "initial-cluster"},
	}
	out := []*change{}
	for _, w := range wanted {
		if w.flag == "initial-cluster-state" && state == "new" && m.Param(w.flag) == "" {
			continue // absent means new
		}
		c, err := m.setFlag(w.flag, w.value, w.after)
		if err != nil {
			return nil, err
		}
		if c != nil {
			out = append(out, c)
		}
	}
	if a := mapGet(m.annotations, "kubeadm.kubernetes.io/etcd.advertise-client-urls"); a != nil && a.Value != clients {
		out = append(out, &change{node: a, value: clients})
	}
	return out, nil
}

// listenClientURLs: the member's own client URLs plus the loopback listeners the configuration had
// besides its advertised URLs (kubeadm's https://127.0.0.1:2379).
func listenClientURLs(p Params, clientURLs []string) []string {
	listen := []string{}
	advertised := splitList(p("advertise-client-urls"))
	for _, u := range splitList(p("listen-client-urls")) {
		if _, ok := local(u); ok && !slices.Contains(advertised, u) {
			listen = append(listen, u)
		}
	}
	for _, u := range clientURLs {
		if !slices.Contains(listen, u) {
			listen = append(listen, u)
		}
	}
	return listen
}

var plainSafe = regexp.MustCompile(`^[A-Za-z0-9/_.=:,@+\[\]-]+$`)

// apply rewrites the manifest's bytes for `changes` and returns them. It consumes m (its tree is
// changed the same way, to check that the new bytes mean exactly that).
func (m *Manifest) apply(changes []*change) ([]byte, error) {
	if len(changes) == 0 {
		return m.raw, nil
	}
	type textEdit struct {
		start, end int
		text       string
	}
	var edits []textEdit
	for _, c := range changes {
		if !plainSafe.MatchString(c.value) || strings.HasPrefix(c.value, "- ") {
			return nil, fmt.Errorf("%q cannot be written as a plain YAML string", c.value)
		}
		start, end, err := m.token(c.node)
		if err != nil {
			return nil, err
		}
		if !c.insert {
			quote := ""
			if c.node.Style == yaml.DoubleQuotedStyle {
				quote = `"`
			} else if c.node.Style == yaml.SingleQuotedStyle {
				quote = "'"
			}
			edits = append(edits, textEdit{start, end, quote + c.value + quote})
			continue
		}
		lineStart := bytes.LastIndexByte(m.raw[:start], '\n') + 1
		prefix := string(m.raw[lineStart:start])
		if strings.TrimSpace(prefix) != "-" {
			return nil, fmt.Errorf("line %d is not a plain `- entry` line", c.node.Line)
		}
		lineEnd := bytes.IndexByte(m.raw[end:], '\n')
		eol := "\n"
		if lineEnd < 0 { // the last line has no newline: the new entry goes on a line of its own
			edits = append(edits, textEdit{len(m.raw), len(m.raw), eol + prefix + c.value})
			continue
		}
		at := end + lineEnd + 1
		if lineEnd > 0 && m.raw[end+lineEnd-1] == '\r' {
			eol = "\r\n"
		}
		edits = append(edits, textEdit{at, at, prefix + c.value + eol})
	}
	// later offsets first, so earlier ones stay valid; two edits never overlap (distinct tokens)
	for i := 1; i < len(edits); i++ {
		for j := i; j > 0 && edits[j].start > edits[j-1].start; j-- {
			edits[j], edits[j-1] = edits[j-1], edits[j]
		}
	}
	out := append([]byte(nil), m.raw...)
	for _, e := range edits {
		out = append(out[:e.start], append([]byte(e.text), out[e.end:]...)...)
	}
	// the same changes on the tree, then both must decode to the same value
	for _, c := range changes {
		if c.insert {
			seq := m.command
			for i, item := range seq.Content {
				if item == c.node {
					n := &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: c.value}
					seq.Content = append(seq.Content[:i+1], append([]*yaml.Node{n}, seq.Content[i+1:]...)...)
					break
				}
			}
		} else {
			c.node.Value = c.value
		}
	}
	var want, got any
	if err := m.doc.Decode(&want); err != nil {
		return nil, fmt.Errorf("cannot check the edit: %v", err)
	}
	check, err := ParseManifest(out)
	if err != nil {
		return nil, fmt.Errorf("the edited manifest %v", err)
	}
	if err := check.doc.Decode(&got); err != nil || !reflect.DeepEqual(want, got) {
		return nil, fmt.Errorf("the edited manifest does not mean what was intended; it was left unchanged")
	}
	return out, nil
}

// token is the byte range of a one-line scalar in the raw text, quotes included.
func (m *Manifest) token(n *yaml.Node) (int, int, error) {
	if n.Kind != yaml.ScalarNode {
		return 0, 0, fmt.Errorf("line %d: not a plain value", n.Line)
	}
	start, ok := offset(m.raw, n.Line, n.Column)
	if !ok {
		return 0, 0, fmt.Errorf("line %d: position out of range", n.Line)
	}
	v := n.Value
	switch n.Style {
	case 0:
		end := start + len(v)
		if end > len(m.raw) || string(m.raw[start:end]) != v ||
			(end < len(m.raw) && !strings.ContainsRune(" \t\r\n", rune(m.raw[end]))) {
			return 0, 0, fmt.Errorf("line %d: %q is not written on one line as a plain value", n.Line, v)
		}
		return start, end, nil
	case yaml.DoubleQuotedStyle, yaml.SingleQuotedStyle:
		q := byte('"')
		if n.Style == yaml.SingleQuotedStyle {
			q = '\''
		}
		end := start + len(v) + 2
		if strings.ContainsAny(v, "\"'\\") || end > len(m.raw) || m.raw[start] != q || m.raw[end-1] != q ||
			string(m.raw[start+1:end-1]) != v {
			return 0, 0, fmt.Errorf("line %d: %q is not written on one line as a simple quoted value", n.Line, v)
		}
		return start, end, nil
	}
	return 0, 0, fmt.Errorf("line %d: %q is a block or folded value", n.Line, v)
}

// offset converts a 1-based line and character column to a byte offset.
func offset(raw []byte, line, column int) (int, bool) {
	pos := 0
	for l := 1; l < line; l++ {
		i := bytes.IndexByte(raw[pos:], '\n')
		if i < 0 {
			return 0, false
		}
		pos += i + 1
	}
	for c := 1; c < column; c++ {
		if pos >= len(raw) || raw[pos] == '\n' {
			return 0, false
		}
		_, size := utf8.DecodeRune(raw[pos:])
		pos += size
	}
	return pos, true
}
