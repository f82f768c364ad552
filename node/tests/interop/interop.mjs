// The JavaScript side of node/tests/interop.rs, with the real
// @automerge/automerge library.
//
//   node interop.mjs IN OUT NEW
//
// Loads the document Concord exported (IN), prints its content and heads as
// one JSON line, edits it and saves it to OUT, and saves a new document made
// here to NEW. Then prints the edited document's content and heads.
import * as Automerge from "@automerge/automerge";
import { readFileSync, writeFileSync } from "node:fs";

const [input, output, fresh] = process.argv.slice(2);
let doc = Automerge.load(new Uint8Array(readFileSync(input)));
const plain = (d) => JSON.parse(JSON.stringify(d));
console.log(JSON.stringify({ loaded: plain(doc), heads: Automerge.getHeads(doc) }));

doc = Automerge.change(doc, { message: "edited in javascript" }, (d) => {
  d.todos.push({ text: "from javascript", done: false });
  d.todos[0].done = true;
  d.visits.increment(2);
  Automerge.splice(d, ["notes"], 5, 0, " from js");
  d.js = true;
});
writeFileSync(output, Automerge.save(doc));

let made = Automerge.from({ made_in: "javascript", items: [1, 2, 3] });
writeFileSync(fresh, Automerge.save(made));
console.log(
  JSON.stringify({
    edited: plain(doc),
    heads: Automerge.getHeads(doc),
    made: plain(made),
    made_heads: Automerge.getHeads(made),
  }),
);
