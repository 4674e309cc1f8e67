package policy

import (
	"bytes"
	"encoding/json"
	"errors"
	"maps"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/santhosh-tekuri/jsonschema/v6"
	"golang.org/x/text/language"
	"golang.org/x/text/message"
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
		{"mode words", enum(at(t, app, "mode")), sortedKeys(modeWords)},
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

// compileSchema compiles procgate.schema.json with a full JSON Schema
// 2020-12 validator, so that every keyword the schema uses is checked.
func compileSchema(t *testing.T) *jsonschema.Schema {
	t.Helper()
	f, err := os.Open("procgate.schema.json")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	doc, err := jsonschema.UnmarshalJSON(f)
	if err != nil {
		t.Fatalf("procgate.schema.json is not JSON: %v", err)
	}
	c := jsonschema.NewCompiler()
	if err := c.AddResource("procgate.schema.json", doc); err != nil {
		t.Fatal(err)
	}
	sch, err := c.Compile("procgate.schema.json")
	if err != nil {
		t.Fatalf("compile procgate.schema.json: %v", err)
	}
	return sch
}

// validateFile returns the schema's complaints about a YAML file, one
// "INSTANCE KEYWORD: MESSAGE" line each, INSTANCE a JSON pointer after $
// and KEYWORD the schema keyword that failed.
func validateFile(t *testing.T, schema *jsonschema.Schema, file string) []string {
	t.Helper()
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var doc any
	if err := yaml.Unmarshal(data, &doc); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	// Through JSON: the validator takes JSON values, and a policy is YAML.
	j, err := json.Marshal(doc)
	if err != nil {
		t.Fatalf("%s: as JSON: %v", file, err)
	}
	inst, err := jsonschema.UnmarshalJSON(bytes.NewReader(j))
	if err != nil {
		t.Fatalf("%s: as JSON: %v", file, err)
	}
	err = schema.Validate(inst)
	if err == nil {
		return nil
	}
	var ve *jsonschema.ValidationError
	if !errors.As(err, &ve) {
		t.Fatalf("%s: %v", file, err)
	}
	// The leaves of the error tree, but a oneOf as one error: its
	// alternatives' failures say only why each does not fit.
	p := message.NewPrinter(language.English)
	var out []string
	var walk func(e *jsonschema.ValidationError)
	walk = func(e *jsonschema.ValidationError) {
		kw := e.ErrorKind.KeywordPath()
		if len(e.Causes) == 0 || (len(kw) > 0 && kw[len(kw)-1] == "oneOf") {
			where := "$"
			for _, k := range e.InstanceLocation {
				where += "/" + k
			}
			out = append(out, where+" "+strings.Join(kw, "/")+": "+e.ErrorKind.LocalizedString(p))
			return
		}
		for _, c := range e.Causes {
			walk(c)
		}
	}
	walk(ve)
	return out
}

func TestSchemaAcceptsValidFiles(t *testing.T) {
	schema := compileSchema(t)
	files, _ := filepath.Glob("testdata/valid/*.yaml")
	files = append(files, "testdata/example.yaml")
	for _, file := range files {
		if errs := validateFile(t, schema, file); len(errs) > 0 {
			t.Errorf("%s does not conform to the schema:\n%s", file, strings.Join(errs, "\n"))
		}
	}
}

func TestSchemaRejectsInvalidFiles(t *testing.T) {
	schema := compileSchema(t)
	// The invalid examples whose mistake is structural, which a schema can
	// see; the rest (host bits, reversed ranges, duplicates) need Parse.
	tests := []struct{ file, want string }{
		{"unknown-field.yaml", "$ additionalProperties: additional properties 'internals' not allowed"},
		{"missing-name.yaml", "$/apps/0 required: missing property 'name'"},
		{"missing-version.yaml", "$ required: missing property 'version'"},
		{"missing-internal.yaml", "$ required: missing property 'internal'"},
		{"bad-version.yaml", "$/version const: value must be 1"},
		{"version-string.yaml", "$/version const: value must be 1"},
		{"bad-proto.yaml", "$/apps/0/allow/0/proto enum: value must be one of 'tcp', 'udp', 'both'"},
		{"bad-inbound.yaml", "$/apps/0/inbound/dynamic/ports minItems: minItems: got 0, want 1"},
		{"bad-inbound.yaml", "$/apps/1/inbound additionalProperties: additional properties 'static' not allowed"},
		{"bad-inbound.yaml", "$/apps/2/inbound/dynamic additionalProperties: additional properties 'any' not allowed"},
		{"bad-inbound.yaml", "$/apps/3/inbound/dynamic required: missing property 'ports'"},
		{"bad-inbound.yaml", "$/apps/0/inbound/dynamic/lease pattern: '1.5s' does not match"},
		{"empty-ports.yaml", "$/apps/0/allow/0/ports minItems: minItems: got 0, want 1"},
		{"port-out-of-range.yaml", "$/apps/0/allow/1/ports/2 oneOf: 'oneOf' failed, none matched"},
		{"bad-sha256.yaml", "$/apps/0/exe/0 oneOf: 'oneOf' failed, none matched"},
		{"bad-exe.yaml", "$/apps/0/exe/0 oneOf: 'oneOf' failed, none matched"},
		{"bad-users.yaml", "$/apps/0/users/4 pattern: '-bob' does not match"},
		{"bad-names.yaml", "$/apps/0/name pattern: 'Psql' does not match"},
		{"bad-audit-rate.yaml", "$/audit/rate maximum: maximum: got 1.000001×10⁰⁶, want 1×10⁰⁶"},
		{"wrong-types.yaml", "$/internal type: got array, want object"},
		{"wrong-types-app.yaml", "$/internal/prefixes type: got string, want array"},
		{"bad-everyone.yaml", "$/everyone additionalProperties: additional properties 'deny' not allowed"},
		{"bad-everyone.yaml", "$/everyone/allow/0 required: missing property 'to'"},
		{"not-a-mapping.yaml", "$ type: got array, want object"},
	}
	for _, tt := range tests {
		errs := validateFile(t, schema, filepath.Join("testdata/invalid", tt.file))
		if !slices.ContainsFunc(errs, func(e string) bool { return strings.HasPrefix(e, tt.want) }) {
			t.Errorf("%s: schema errors %q lack %q", tt.file, errs, tt.want)
		}
	}
}
