#!/usr/bin/env node
/*
 * Validates Amazon States Language files with AWS's own language service
 * (amazon-states-language-service, what the AWS Toolkit runs in the editor): the ASL JSON
 * schema plus its state checks (transitions to missing states, unreachable states,
 * Retry/Catch placement, field combinations).
 *
 * Usage: node validate.js FILE [FILE ...]
 * Each FILE is a definition whose ${...} DefinitionSubstitutions are already filled in
 * (tests/test_asl_rules.py renders it as CloudFormation would). Prints one JSON object:
 * {"FILE": [{"severity", "line", "character", "message", "source"}], ...} with every
 * diagnostic, and exits 1 when any file has an error (severity 1), 2 on a usage problem.
 */
"use strict";

const fs = require("fs");
const { getLanguageService, TextDocument, DiagnosticSeverity } = require("amazon-states-language-service");

async function diagnose(service, path) {
  const text = fs.readFileSync(path, "utf8");
  const document = TextDocument.create(`file://${path}`, "asl", 0, text);
  const parsed = service.parseJSONDocument(document);
  const found = await service.doValidation(document, parsed);
  return found.map((d) => ({
    severity: d.severity,
    line: d.range.start.line + 1,
    character: d.range.start.character + 1,
    message: d.message,
    source: d.source || "asl",
  }));
}

async function main(paths) {
  if (paths.length === 0) {
    process.stderr.write("usage: node validate.js FILE [FILE ...]\n");
    return 2;
  }
  const service = getLanguageService({});
  const report = {};
  let errors = 0;
  for (const path of paths) {
    report[path] = await diagnose(service, path);
    errors += report[path].filter((d) => d.severity === DiagnosticSeverity.Error).length;
  }
  process.stdout.write(JSON.stringify(report, null, 2) + "\n");
  return errors > 0 ? 1 : 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err) => {
    process.stderr.write(`${err.stack || err}\n`);
    process.exit(2);
  },
);
