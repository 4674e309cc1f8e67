package policy

import (
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"
	"unicode/utf8"

	"gopkg.in/yaml.v3"

	"github.com/procgate/procgate/ruleset"
)

func loadSchema(t *testing.T) map[string]any {
	t.Helper()
	data, err := os.ReadFile("procgate.schema.json")
	if err != nil {
		t.Fatal(err)
	}
	var s map[string]any
	if err := json.Unmarshal(data, &s); err != nil {
		t.Fatalf("procgate.schema.json is not JSON: %v", err)
	}
	return s
}

// at follows a path of keys through nested JSON objects.
func at(t *testing.T, s map[string]any, keys ...string) map[string]any {
	t.Helper()
	cur := s
	for _, k := range keys {
		next, ok := cur[k].(map[string]any)
		if !ok {
			t.Fatalf("schema has no object at %s", strings.Join(keys, "/"))
		}
		cur = next
	}
	return cur
}

func sortedKeys[V any](m map[string]V) []string { return slices.Sorted(maps.Keys(m)) }

func TestSchemaFieldsMatchParser(t *testing.T) {
	s := loadSchema(t)
	exeObject, _ := at(t, s, "$defs", "exe")["oneOf"].([]any)[1].(map[string]any)
	tests := []struct {
		where string
		obj   map[string]any
		keys  []string
	}{
		{"/", s, topKeys},
		{"/properties/internal", at(t, s, "properties", "internal"), internalKeys},
		{"/properties/audit", at(t, s, "properties", "audit"), auditKeys},
		{"/properties/everyone", at(t, s, "properties", "everyone"), everyoneKeys},
		{"/$defs/app", at(t, s, "$defs", "app"), appKeys},
		{"/$defs/grant", at(t, s, "$defs", "grant"), grantKeys},
		{"/$defs/app/properties/inbound", at(t, s, "$defs", "app", "properties", "inbound"), inboundKeys},
		{"/$defs/dynamic", at(t, s, "$defs", "dynamic"), dynamicKeys},
		{"/$defs/exe/oneOf/1", exeObject, exeKeys},
	}
	for _, tt := range tests {
		props, _ := tt.obj["properties"].(map[string]any)
		if got, want := sortedKeys(props), slices.Sorted(slices.Values(tt.keys)); !reflect.DeepEqual(got, want) {
			t.Errorf("schema %s lists fields %v; the parser accepts %v", tt.where, got, want)
		}
		if tt.obj["additionalProperties"] != false {
			t.Errorf("schema %s allows unknown fields; the parser rejects them", tt.where)
		}
	}
}

func TestSchemaValuesMatchParser(t *testing.T) {
	s := loadSchema(t)
	app := at(t, s, "$defs", "app", "properties")
	grant := at(t, s, "$defs", "grant", "properties")
	rate := at(t, s, "properties", "audit", "properties", "rate")
	enum := func(m map[string]any) []string {
		var out []string
		for _, v := range m["enum"].([]any) {
			out = append(out, v.(string))
		}
		return slices.Sorted(slices.Values(out))
	}
	tests := []struct {
		name      string
		got, want any
	}{
		{"app name pattern", at(t, app, "name")["pattern"], namePattern},
		{"user pattern", at(t, app, "users", "items")["pattern"], userPattern},
		{"proto words", enum(at(t, grant, "proto")), sortedKeys(protoWords)},
		{"inbound proto words", enum(at(t, s, "$defs", "dynamic", "properties", "proto")), sortedKeys(protoWords)},
		{"audit words", enum(at(t, app, "audit")), sortedKeys(auditWords)},
		{"outside words", enum(at(t, app, "outside")), sortedKeys(denyWords)},
		{"loopback words", enum(at(t, app, "loopback")), sortedKeys(denyWords)},
		{"keep_caps names", enum(at(t, app, "keep_caps", "items")), slices.Sorted(slices.Values(ruleset.LauncherDrops))},
		{"version", at(t, s, "properties", "version")["const"], float64(Version)},
		{"audit rate default", rate["default"], float64(DefaultAuditRate)},
		{"audit rate maximum", rate["maximum"], float64(MaxAuditRate)},
	}
	for _, tt := range tests {
		if !reflect.DeepEqual(tt.got, tt.want) {
			t.Errorf("%s: schema says %v, parser %v", tt.name, tt.got, tt.want)
		}
	}
}

// validator checks a value against the subset of JSON Schema 2020-12 that
// procgate.schema.json uses. A keyword it does not know fails the test, so
// that the schema cannot grow a rule this check silently skips.
type validator struct {
	root map[string]any
	errs []string
}

var annotations = []string{"$schema", "$id", "title", "description", "default"}

func (v *validator) fail(where, format string, args ...any) {
	v.errs = append(v.errs, where+": "+fmt.Sprintf(format, args...))
}

// asFloat returns YAML and JSON numbers as float64, for comparing them.
func asFloat(x any) (float64, bool) {
	switch n := x.(type) {
	case int:
		return float64(n), true
	case int64:
		return float64(n), true
	case uint64:
		return float64(n), true
	case float64:
		return n, true
	}
	return 0, false
}

func same(a, b any) bool {
	if x, ok := asFloat(a); ok {
		y, ok := asFloat(b)
		return ok && x == y
	}
	return reflect.DeepEqual(a, b)
}

func hasType(x any, typ string) bool {
	switch typ {
	case "object":
		_, ok := x.(map[string]any)
		return ok
	case "array":
		_, ok := x.([]any)
		return ok
	case "string":
		_, ok := x.(string)
		return ok
	case "boolean":
		_, ok := x.(bool)
		return ok
	case "integer":
		switch x.(type) {
		case int, int64, uint64:
			return true
		}
	}
	return false
}

func (v *validator) check(s map[string]any, x any, where string) {
	for kw, arg := range s {
		switch kw {
		case "$ref":
			name, ok := strings.CutPrefix(arg.(string), "#/$defs/")
			def, found := v.root["$defs"].(map[string]any)[name].(map[string]any)
			if !ok || !found {
				v.fail(where, "unresolvable $ref %v", arg)
				continue
			}
			v.check(def, x, where)
		case "type":
			if !hasType(x, arg.(string)) {
				v.fail(where, "%v is not of type %v", x, arg)
			}
		case "const":
			if !same(x, arg) {
				v.fail(where, "%v is not %v", x, arg)
			}
		case "enum":
			if !slices.ContainsFunc(arg.([]any), func(e any) bool { return same(x, e) }) {
				v.fail(where, "%v is not one of %v", x, arg)
			}
		case "properties":
			v.properties(s, x, where)
		case "additionalProperties":
			if _, both := s["properties"]; !both {
				v.properties(s, x, where)
			}
		case "required":
			if obj, ok := x.(map[string]any); ok {
				for _, r := range arg.([]any) {
					if _, ok := obj[r.(string)]; !ok {
						v.fail(where, "missing required %v", r)
					}
				}
			}
		case "items":
			if list, ok := x.([]any); ok {
				for i, item := range list {
					v.check(arg.(map[string]any), item, fmt.Sprintf("%s[%d]", where, i))
				}
			}
		case "minItems":
			if list, ok := x.([]any); ok && float64(len(list)) < arg.(float64) {
				v.fail(where, "fewer than %v items", arg)
			}
		case "minLength", "maxLength":
			if str, ok := x.(string); ok {
				n := float64(utf8.RuneCountInString(str))
				if (kw == "minLength" && n < arg.(float64)) || (kw == "maxLength" && n > arg.(float64)) {
					v.fail(where, "length of %q breaks %s %v", str, kw, arg)
				}
			}
		case "pattern":
			if str, ok := x.(string); ok && !regexp.MustCompile(arg.(string)).MatchString(str) {
				v.fail(where, "%q does not match %v", str, arg)
			}
		case "minimum", "maximum":
			if n, ok := asFloat(x); ok && ((kw == "minimum" && n < arg.(float64)) || (kw == "maximum" && n > arg.(float64))) {
				v.fail(where, "%v breaks %s %v", x, kw, arg)
			}
		case "oneOf":
			matched := 0
			for _, alt := range arg.([]any) {
				sub := &validator{root: v.root}
				sub.check(alt.(map[string]any), x, where)
				if len(sub.errs) == 0 {
					matched++
				}
			}
			if matched != 1 {
				v.fail(where, "%v matches %d alternatives of oneOf, want 1", x, matched)
			}
		default:
			if !slices.Contains(annotations, kw) && kw != "$defs" {
				v.fail(where, "schema keyword %q is not supported by this test's validator", kw)
			}
		}
	}
}

// properties checks an object's fields against "properties" and
// "additionalProperties".
func (v *validator) properties(s map[string]any, x any, where string) {
	obj, ok := x.(map[string]any)
	if !ok {
		return
	}
	props, _ := s["properties"].(map[string]any)
	for k, val := range obj {
		if sub, ok := props[k].(map[string]any); ok {
			v.check(sub, val, where+"."+k)
		} else if s["additionalProperties"] == false {
			v.fail(where, "unknown field %q", k)
		}
	}
}

func validateFile(t *testing.T, schema map[string]any, file string) []string {
	t.Helper()
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var doc any
	if err := yaml.Unmarshal(data, &doc); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	v := &validator{root: schema}
	v.check(schema, doc, "$")
	return v.errs
}

func TestSchemaAcceptsValidFiles(t *testing.T) {
	schema := loadSchema(t)
	files, _ := filepath.Glob("testdata/valid/*.yaml")
	files = append(files, "testdata/example.yaml")
	for _, file := range files {
		if errs := validateFile(t, schema, file); len(errs) > 0 {
			t.Errorf("%s does not conform to the schema:\n%s", file, strings.Join(errs, "\n"))
		}
	}
}

func TestSchemaRejectsInvalidFiles(t *testing.T) {
	schema := loadSchema(t)
	// The invalid examples whose mistake is structural, which a schema can
	// see; the rest (host bits, reversed ranges, duplicates) need Parse.
	tests := []struct{ file, want string }{
		{"unknown-field.yaml", `$: unknown field "internals"`},
		{"missing-name.yaml", "$.apps[0]: missing required name"},
		{"missing-version.yaml", "$: missing required version"},
		{"missing-internal.yaml", "$: missing required internal"},
		{"bad-version.yaml", "$.version: 2 is not 1"},
		{"version-string.yaml", "$.version: 1 is not 1"},
		{"bad-proto.yaml", "$.apps[0].allow[0].proto: icmp is not one of [tcp udp both]"},
		{"bad-inbound.yaml", "$.apps[0].inbound.dynamic.ports: fewer than 1 items"},
		{"bad-inbound.yaml", `$.apps[1].inbound: unknown field "static"`},
		{"bad-inbound.yaml", `$.apps[2].inbound.dynamic: unknown field "any"`},
		{"bad-inbound.yaml", "$.apps[3].inbound.dynamic: missing required ports"},
		{"bad-inbound.yaml", `$.apps[0].inbound.dynamic.lease: "1.5s" does not match`},
		{"empty-ports.yaml", "$.apps[0].allow[0].ports: fewer than 1 items"},
		{"port-out-of-range.yaml", "$.apps[0].allow[1].ports[2]: 70000 matches 0 alternatives of oneOf, want 1"},
		{"bad-sha256.yaml", "$.apps[0].exe[0]: map[path:/usr/bin/psql sha256:3f79bb7b435b05321651daefd374cdc681dc06faa65e374e38337b88ca046de] matches 0 alternatives"},
		{"bad-exe.yaml", "$.apps[0].exe[0]: usr/bin/psql matches 0 alternatives"},
		{"bad-users.yaml", `$.apps[0].users[4]: "-bob" does not match`},
		{"bad-names.yaml", `$.apps[0].name: "Psql" does not match`},
		{"bad-audit-rate.yaml", "$.audit.rate: 1000001 breaks maximum 1e+06"},
		{"wrong-types.yaml", "$.internal: [10.0.0.0/8] is not of type object"},
		{"wrong-types-app.yaml", "$.internal.prefixes: 10.0.0.0/8 is not of type array"},
		{"bad-everyone.yaml", `$.everyone: unknown field "deny"`},
		{"bad-everyone.yaml", "$.everyone.allow[0]: missing required to"},
		{"not-a-mapping.yaml", "$: [map[version:1]] is not of type object"},
	}
	for _, tt := range tests {
		errs := validateFile(t, schema, filepath.Join("testdata/invalid", tt.file))
		if !slices.ContainsFunc(errs, func(e string) bool { return strings.HasPrefix(e, tt.want) }) {
			t.Errorf("%s: schema errors %q lack %q", tt.file, errs, tt.want)
		}
	}
}
