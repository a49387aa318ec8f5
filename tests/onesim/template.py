"""oned's template language: parsing, merging, names and the XML it renders.

A template is a list of ``(NAME, value)`` pairs; a value is a string (single attribute) or a
``dict`` (vector attribute such as DISK, NIC, CONTEXT). Names repeat (several DISKs).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

TValue = str | dict[str, str]
Template = list[tuple[str, TValue]]

# oned: src/pool/PoolObjectSQL.cc (INVALID_NAME_CHARS, name_is_valid)
INVALID_NAME_CHARS = "&|:\\\";/'#{}$<>\t\n\v\f\r"
MAX_NAME_BYTES = 128


class TemplateSyntaxError(Exception):
    pass


def name_error(name: str) -> str | None:
    """oned's reason for refusing name, or None when it is valid.

    oned: src/pool/PoolObjectSQL.cc name_is_valid -- the length is std::string::length(), i.e.
    bytes of UTF-8, checked after the characters."""
    if not name:
        return "Invalid NAME, it cannot be empty"
    for ch in name:
        if ch in INVALID_NAME_CHARS:
            return f"Invalid NAME, char '{ch}' is not allowed"
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        return f"Invalid NAME, max length is {MAX_NAME_BYTES} chars"
    return None


# --- text form: oned: src/parsers/template_parser.l and template_syntax.y ----------------------
_INITIAL_RULES: list[tuple[str, re.Pattern[str]]] = [
    ("COMMENT", re.compile(r"[ \t]*#[^\n]*(?:\n|\Z)")),
    ("BLANK", re.compile(r"[ \t\n]+")),
    ("VARIABLE", re.compile(r"[A-Za-z0-9_]+")),
    ("EQUAL", re.compile(r"[ \t]*=[ \t]*")),
    ("EQUAL_EMPTY", re.compile(r"[ \t]*=[ \t]*\n")),
    ("COMMA", re.compile(r"[ \t\n]*,[ \t\n]*")),
    ("CBRACKET", re.compile(r"[ \t\n]*\][ \t\n]*")),
]
# VALUE is an exclusive start condition: only these rules apply after '='
_VALUE_RULES: list[tuple[str, re.Pattern[str]]] = [
    ("OBRACKET", re.compile(r"[ \t]*\[[ \t\n]*")),
    ("CCDATA", re.compile(r"[^\n]*\]\]>[^\n]*")),
    ("QSTRING", re.compile(r'"(?:\\"|[^"])*"')),
    ("STRING", re.compile(r"[^=# \t\n,\[\]]+")),
]


def _lex(text: str) -> list[tuple[str, str, int]]:
    """Tokenise like flex: longest match, ties to the rule listed first."""
    tokens: list[tuple[str, str, int]] = []
    pos, line, in_value = 0, 1, False
    while pos < len(text):
        rules = _VALUE_RULES if in_value else _INITIAL_RULES
        best: tuple[str, str] | None = None
        for kind, rx in rules:
            m = rx.match(text, pos)
            if m and m.end() > pos and (best is None or len(m.group(0)) > len(best[1])):
                best = (kind, m.group(0))
        if best is None:
            raise TemplateSyntaxError(f"syntax error, unexpected character {text[pos]!r} "
                                      f"at line {line}")
        kind, lexeme = best
        pos += len(lexeme)
        if kind in ("COMMENT", "BLANK"):
            pass
        elif kind == "EQUAL":
            in_value = True
            tokens.append((kind, lexeme, line))
        elif kind in ("OBRACKET", "CCDATA"):
            in_value = False
            tokens.append((kind, lexeme, line))
        elif kind == "QSTRING":
            in_value = False
            tokens.append(("STRING", lexeme[1:-1], line))
        elif kind == "STRING":
            in_value = False
            tokens.append(("STRING", lexeme, line))
        else:
            tokens.append((kind, lexeme, line))
        line += lexeme.count("\n")
    return tokens


def attribute_name(name: str) -> str:
    """oned: include/Attribute.h -- upper-case; prefix ONE_ unless it starts with a letter or '_',
    or when it starts with "XML" (tested on the name as sent)."""
    up = name.upper()
    if up and (not (name[0].isalpha() or name[0] == "_") or name.startswith("XML")):
        up = "ONE_" + up
    return up


def _unescape(value: str) -> str:
    return value.replace('\\"', '"')


def parse_template(text: str) -> Template:
    """Parse oned template syntax, or the XML form when the text starts with '<'.

    oned: src/template/Template.cc parse_str_or_xml (then trim_name: trailing blanks of NAME go).
    """
    out = _parse_xml_template(text) if text.lstrip().startswith("<") else _parse_text_template(text)
    return [(k, v.rstrip(" \f\n\r\t\v")) if k == "NAME" and isinstance(v, str) else (k, v)
            for k, v in out]


def _parse_text_template(text: str) -> Template:
    toks = _lex(text)
    out: Template = []
    i = 0

    def expect(kind: str) -> tuple[str, str, int]:
        nonlocal i
        if i >= len(toks):
            raise TemplateSyntaxError(f"syntax error, unexpected end of file, expecting {kind}")
        tok = toks[i]
        if tok[0] != kind:
            raise TemplateSyntaxError(f"syntax error, unexpected {tok[0]}, expecting {kind} "
                                      f"at line {tok[2]}")
        i += 1
        return tok

    while i < len(toks):
        name = expect("VARIABLE")[1]
        if i < len(toks) and toks[i][0] == "EQUAL_EMPTY":
            # `KEY =` at the end of a line and `KEY = ""` both keep KEY with an empty value
            i += 1
            out.append((attribute_name(name), ""))
            continue
        expect("EQUAL")
        if i >= len(toks):
            raise TemplateSyntaxError("syntax error, unexpected end of file")
        kind = toks[i][0]
        if kind == "STRING":
            out.append((attribute_name(name), _unescape(toks[i][1])))
            i += 1
        elif kind == "CCDATA":
            raise TemplateSyntaxError(f"syntax error, unexpected CCDATA at line {toks[i][2]}")
        elif kind == "OBRACKET":
            i += 1
            vec: dict[str, str] = {}
            if i < len(toks) and toks[i][0] == "CBRACKET":
                i += 1
            else:
                while True:
                    sub = expect("VARIABLE")[1].upper()
                    expect("EQUAL")
                    # std::map::insert: the first of repeated sub-attributes wins
                    vec.setdefault(sub, _unescape(expect("STRING")[1]))
                    if i < len(toks) and toks[i][0] == "COMMA":
                        i += 1
                        continue
                    expect("CBRACKET")
                    break
            out.append((attribute_name(name), vec))
        else:
            raise TemplateSyntaxError(f"syntax error, unexpected {kind} at line {toks[i][2]}")
    return out


def _parse_xml_template(text: str) -> Template:
    """oned: src/template/Template.cc rebuild_attributes, single_xml_att, vector_xml_att.

    An element with exactly one text child is a single attribute; one with element children a
    vector (sub-elements without text are skipped, a repeated one replaces the earlier); an empty
    element (``<KEY/>``, ``<KEY></KEY>``) is neither and is dropped."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError:
        raise TemplateSyntaxError("XML Template malformed.") from None
    out: Template = []
    for child in root:
        if len(child):
            vec: dict[str, str] = {}
            for sub in child:
                if sub.text:
                    vec[sub.tag] = sub.text
            out.append((attribute_name(child.tag), vec))
        elif child.text:
            out.append((attribute_name(child.tag), child.text))
    return out


# --- operations ----------------------------------------------------------------------------------
def tget(tmpl: Template, key: str) -> str | None:
    for k, v in tmpl:
        if k == key and isinstance(v, str):
            return v
    return None


def terase(tmpl: Template, key: str) -> str:
    """Remove every attribute named key; return the first single value ('' if none)."""
    value = ""
    found = False
    for k, v in list(tmpl):
        if k == key:
            if not found and isinstance(v, str):
                value, found = v, True
            tmpl.remove((k, v))
    return value


def vectors(tmpl: Template, key: str) -> list[dict[str, str]]:
    return [v for k, v in tmpl if k == key and isinstance(v, dict)]


def merge(base: Template, new: Template) -> Template:
    """oned: src/template/Template.cc Template::merge -- every attribute named in new is erased
    from base first (all DISKs when new has a DISK), then new's are added; an empty vector
    (``KEY = []``) only erases."""
    names = {k for k, _ in new}
    out = [(k, v) for k, v in base if k not in names]
    out.extend((k, dict(v) if isinstance(v, dict) else v) for k, v in new
               if not (isinstance(v, dict) and not v))
    return out


def cdata(value: str) -> str:
    """oned: include/NebulaUtil.h escape_xml -- CDATA around the value, nothing split."""
    return "<![CDATA[" + value + "]]>"


def template_to_xml(tmpl: Template, root: str = "TEMPLATE") -> str:
    """oned: Template::to_xml over a std::multimap (names sorted, repeats in insertion order);
    a vector's sub-attributes come from a std::map (sorted)."""
    parts = [f"<{root}>"]
    for k, v in sorted(tmpl, key=lambda kv: kv[0]):
        if isinstance(v, dict):
            parts.append(f"<{k}>" + "".join(f"<{sk}>{cdata(v[sk])}</{sk}>" for sk in sorted(v)
                                            if sk) + f"</{k}>")
        else:
            parts.append(f"<{k}>{cdata(v)}</{k}>")
    parts.append(f"</{root}>")
    return "".join(parts)


def xml_safe(tmpl: Template) -> bool:
    """Can oned store this template? Its object bodies are validated as XML before they are
    written (PoolObjectSQL::validate_xml in Image/VMTemplate insert_replace), and a value holding
    ``]]>`` ends the CDATA early."""
    for _, v in tmpl:
        values = v.values() if isinstance(v, dict) else [v]
        if any("]]>" in x for x in values):
            return False
    return True
