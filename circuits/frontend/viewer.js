// gemma-circuits interactive attribution-graph viewer. One self-contained page: no network, no libraries.
// Data: GRAPH (see circuits/render.py html_data): nodes with layout boxes, labels (label: the drawn line,
// sub: a smaller line beneath, name: the whole label, label_source) and their strongest inputs/outputs
// [[node index, weight]], edges [source, target, weight] as node indices, dashboards by feature key
// (a node's `dashboard`), supernodes [{name, members: [node ids]}] (from metadata), head_loadings
// ({definition, edges: [{source, target, weight, stay, heads: [{layer, head, loading, key_pos}], qk}]}
// or null: the attention heads that carry edges, and the QK attribution of an edge's top head).
(function () {
  'use strict';
  const D = GRAPH;
  const NS = 'http://www.w3.org/2000/svg';
  const $ = (id) => document.getElementById(id);
  const svg = $('graph'), viewport = $('viewport'), tooltip = $('tooltip'), panel = $('panel-body');
  const nodes = D.nodes, edges = D.edges;
  const idToIndex = new Map(nodes.map((n, i) => [n.id, i]));
  const wmax = edges.reduce((m, e) => Math.max(m, Math.abs(e[2])), 0) || 1;
  const storeKey = 'gemma-circuits:supernodes:' + hash(D.model + '\u0000' + D.prompt + '\u0000' + nodes.length);

  // head loadings by edge, keyed 'source index,target index'
  const loadedEdges = new Map();
  ((D.head_loadings && D.head_loadings.edges) || []).forEach((e) => {
    const s = idToIndex.get(e.source), t = idToIndex.get(e.target);
    if (s !== undefined && t !== undefined) loadedEdges.set(s + ',' + t, e);
  });

  const state = {
    // focus: the clicked item (node or supernode); edge: the clicked link {from, to, weight} (items)
    edgeMin: 0, nodeMin: 0, focus: null, edge: null, selected: new Set(), collapsed: false,
    groups: loadStoredGroups() || groupsFrom(D.supernodes || []),
    view: { x: 0, y: 0, k: 1 },
  };

  function hash(s) {
    let h = 2166136261;
    for (let i = 0; i < s.length; i++) h = Math.imul(h ^ s.charCodeAt(i), 16777619);
    return (h >>> 0).toString(16);
  }
  function el(tag, attrs, parent) {
    const e = document.createElementNS(NS, tag);
    for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }
  function html(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  }
  const fmt = (w) => (Math.abs(w) >= 100 || Math.abs(w) < 0.01 ? w.toExponential(2) : w.toFixed(3));
  const visibleToken = (s) => (s === '' ? '∅' : s.replace(/\n/g, '⏎').replace(/ /g, '·'));

  // -- the effective graph: groups collapsed into supernodes or not ---------------------------------
  function groupOf() {
    const m = new Map();
    state.groups.forEach((g, gi) => g.members.forEach((id) => { if (idToIndex.has(id)) m.set(idToIndex.get(id), gi); }));
    return m;
  }

  function nodeVisible(n) {
    return n.kind === 'token' || n.kind === 'logit' || n.score >= state.nodeMin;
  }

  // Returns {items, links}: items are drawn boxes (original nodes or supernodes), links [from, to, weight]
  // between item indices.
  function effectiveGraph() {
    const items = [];
    const itemOfNode = new Array(nodes.length).fill(-1);
    const groups = state.collapsed ? groupOf() : new Map();
    const superItem = new Map();
    nodes.forEach((n, i) => {
      if (groups.has(i)) {
        const gi = groups.get(i);
        if (!superItem.has(gi)) {
          superItem.set(gi, items.length);
          items.push({ kind: 'super', group: gi, id: 'group:' + gi, members: [], label: state.groups[gi].name });
        }
        items[superItem.get(gi)].members.push(i);
        itemOfNode[i] = superItem.get(gi);
      } else if (nodeVisible(n)) {
        itemOfNode[i] = items.length;
        items.push({ kind: n.kind, node: i, id: n.id, x: n.x, y: n.y, w: n.w, h: n.h, label: n.label, sub: n.sub, font: n.font, score: n.score });
      }
    });
    for (const it of items) {
      if (it.kind !== 'super') continue;
      const ms = it.members.map((i) => nodes[i]);
      it.x = ms.reduce((s, n) => s + n.x, 0) / ms.length;
      it.y = ms.reduce((s, n) => s + n.y, 0) / ms.length;
      it.w = Math.max(60, 6.2 * it.label.length + 14);
      it.h = 26;
      it.score = Math.max(...ms.map((n) => n.score));
    }
    const sums = new Map();
    for (const [s, t, w] of edges) {
      const a = itemOfNode[s], b = itemOfNode[t];
      if (a < 0 || b < 0 || a === b) continue;
      const key = a + ',' + b;
      sums.set(key, (sums.get(key) || 0) + w);
    }
    const links = [];
    for (const [key, w] of sums) {
      if (Math.abs(w) < state.edgeMin) continue;
      const [a, b] = key.split(',').map(Number);
      links.push([a, b, w]);
    }
    links.sort((p, q) => Math.abs(p[2]) - Math.abs(q[2]));
    return { items, links };
  }

  // -- drawing -------------------------------------------------------------------------------------
  let current = { items: [], links: [] };
  let itemEls = [], linkEls = [];

  function drawStatic() {
    const rows = $('layer-rows');
    for (const [text, y] of D.rows) {
      el('line', { x1: 40, x2: D.width - 10, y1: y, y2: y, class: 'row-line' }, rows);
      el('text', { x: 6, y: y + 3, class: 'row-label' }, rows).textContent = text;
    }
    D.cols.forEach((x, p) => {
      el('text', { x: x, y: D.height - 2, class: 'col-label' }, rows).textContent = String(p);
    });
  }

  function featureFill(score) {
    const shade = Math.round(240 - 110 * score);
    return `rgb(${shade},${shade + 8},255)`;
  }

  function edgePath(a, b) {
    const x1 = a.x, y1 = a.y - a.h / 2 * Math.sign(a.y - b.y || 1), x2 = b.x, y2 = b.y + b.h / 2 * Math.sign(a.y - b.y || 1);
    const dy = (y2 - y1) * 0.45;
    return `M${x1},${y1} C${x1},${y1 + dy} ${x2},${y2 - dy} ${x2},${y2}`;
  }

  function draw() {
    current = effectiveGraph();
    state.edge = null;  // item indices change with the drawing
    const { items, links } = current;
    const gEdges = $('layer-edges'), gNodes = $('layer-nodes'), gGroups = $('layer-groups');
    gEdges.textContent = ''; gNodes.textContent = ''; gGroups.textContent = '';
    const lmax = links.reduce((m, l) => Math.max(m, Math.abs(l[2])), 0) || 1;
    linkEls = links.map(([a, b, w]) => {
      const r = Math.sqrt(Math.abs(w) / lmax);
      const p = el('path', {
        d: edgePath(items[a], items[b]), class: 'edge', stroke: w >= 0 ? '#2563eb' : '#dc2626',
        'stroke-width': (0.4 + 3.6 * r).toFixed(2), 'stroke-opacity': (0.15 + 0.7 * r).toFixed(2),
      }, gEdges);
      p.dataset.from = a; p.dataset.to = b; p.dataset.weight = w;
      if (loadingOf(items[a], items[b])) p.classList.add('loaded');
      return p;
    });
    itemEls = items.map((it, k) => {
      const g = el('g', { class: 'node ' + it.kind, transform: `translate(${it.x},${it.y})` }, gNodes);
      g.dataset.item = k; g.dataset.id = it.id;
      const r = el('rect', { x: -it.w / 2, y: -it.h / 2, width: it.w, height: it.h, rx: it.kind === 'token' ? 2 : 5 }, g);
      if (it.kind === 'feature') r.style.fill = featureFill(it.score);
      // the label, and beneath it in a smaller font the feature's L/F id (or a logit's probability)
      const main = el('text', { y: it.sub ? -4.5 : 0 }, g);
      main.textContent = String(it.label);
      if (it.font) main.style.fontSize = it.font + 'px';
      if (it.sub) el('text', { y: 6, class: 'sub' }, g).textContent = it.sub;
      return g;
    });
    if (!state.collapsed) drawHulls(gGroups);
    applyHighlight();
    updateFacts();
  }

  function drawHulls(parent) {
    state.groups.forEach((grp, gi) => {
      const ms = grp.members.map((id) => idToIndex.get(id)).filter((i) => i !== undefined && nodeVisible(nodes[i]));
      if (!ms.length) return;
      const x0 = Math.min(...ms.map((i) => nodes[i].x - nodes[i].w / 2)) - 5;
      const x1 = Math.max(...ms.map((i) => nodes[i].x + nodes[i].w / 2)) + 5;
      const y0 = Math.min(...ms.map((i) => nodes[i].y - nodes[i].h / 2)) - 13;
      const y1 = Math.max(...ms.map((i) => nodes[i].y + nodes[i].h / 2)) + 5;
      el('rect', { x: x0, y: y0, width: x1 - x0, height: y1 - y0, rx: 7, class: 'group-hull' }, parent).dataset.group = gi;
      el('text', { x: x0 + 4, y: y0 + 9, class: 'group-label' }, parent).textContent = grp.name;
    });
  }

  function applyHighlight() {
    const focus = state.focus, edge = state.edge;
    svg.classList.toggle('dimmed', focus !== null || edge !== null);
    const near = new Set(focus === null ? [] : [focus]);
    linkEls.forEach((p) => {
      const a = +p.dataset.from, b = +p.dataset.to;
      const on = edge !== null ? a === edge.from && b === edge.to : focus !== null && (a === focus || b === focus);
      p.classList.toggle('hl', on);
      if (on) { near.add(a); near.add(b); }
    });
    itemEls.forEach((g, k) => {
      const it = current.items[k];
      g.classList.toggle('near', near.has(k));
      g.classList.toggle('focus', k === focus);
      g.classList.toggle('selected', it.node !== undefined && state.selected.has(it.node));
    });
    $('group').disabled = state.selected.size < 2;
  }

  function updateFacts() {
    const f = [];
    const nf = nodes.filter((n) => n.kind === 'feature').length;
    f.push(`${D.model || 'model'} · ${nf} features, ${nodes.length - nf} other nodes`);
    f.push(`${current.links.length} of ${edges.length} edges shown`);
    if (loadedEdges.size) f.push(`${loadedEdges.size} edges with head loadings (dashed: click one)`);
    if (D.scores) {
      for (const [which, s] of Object.entries(D.scores)) {
        f.push(`${which}: replacement ${s.replacement.toFixed(3)}, completeness ${s.completeness.toFixed(3)}`);
      }
    }
    $('facts').textContent = f.join('  ·  ');
  }

  // -- the side panel ------------------------------------------------------------------------------
  function itemName(it) {
    return it.kind === 'super' ? '▣ ' + it.label : nodes[it.node].name;
  }
  // what tells a node apart when its name alone does not: a labelled feature's L/F id, a position
  function nodeAside(n) {
    if (n.kind === 'feature') return n.sub;
    return n.kind === 'logit' ? '' : 'pos ' + n.pos;
  }
  const SOURCES = { human: 'human label', auto: 'auto label, from the feature\'s dashboard', default: 'no label' };
  function itemOfNode(i) {
    return current.items.findIndex((it) => it.node === i || (it.members !== undefined && it.members.includes(i)));
  }

  function linkTable(title, rows) {
    const frag = document.createDocumentFragment();
    frag.appendChild(html('h3', `${title} (${rows.length})`));
    if (!rows.length) { frag.appendChild(html('div', 'none shown at this threshold', 'hint')); return frag; }
    const table = html('table');
    rows.slice(0, 40).forEach(([k, w]) => {
      const tr = html('tr', undefined, 'link');
      tr.appendChild(html('td', itemName(current.items[k])));
      tr.appendChild(html('td', (w >= 0 ? '+' : '') + fmt(w), 'w ' + (w >= 0 ? 'pos' : 'neg')));
      tr.addEventListener('click', () => focusItem(k));
      table.appendChild(tr);
    });
    frag.appendChild(table);
    if (rows.length > 40) frag.appendChild(html('div', `… ${rows.length - 40} more`, 'hint'));
    return frag;
  }

  // a node's strongest links over all its edges (html_data picks them), whatever the thresholds
  function strongestTable(title, links, total) {
    const frag = document.createDocumentFragment();
    frag.appendChild(html('h3', `strongest ${title} (${links.length} of ${total})`));
    if (!links.length) { frag.appendChild(html('div', 'none', 'hint')); return frag; }
    const table = html('table', undefined, 'strongest ' + title);
    links.forEach(([j, w]) => {
      const k = itemOfNode(j), other = nodes[j];
      const tr = html('tr', undefined, k >= 0 ? 'link' : 'off');
      const name = html('td', other.name);
      const aside = nodeAside(other);
      if (aside && aside !== other.name) name.appendChild(html('span', ' ' + aside, 'aside'));
      tr.appendChild(name);
      tr.appendChild(html('td', (w >= 0 ? '+' : '') + fmt(w), 'w ' + (w >= 0 ? 'pos' : 'neg')));
      if (k >= 0) tr.addEventListener('click', () => focusItem(k)); else tr.title = 'hidden at this node threshold';
      table.appendChild(tr);
    });
    frag.appendChild(table);
    return frag;
  }

  function tokenList(title, pairs, cls) {
    const box = html('div', undefined, 'token-list');
    box.appendChild(html('span', title + ' ', 'hint'));
    pairs.slice(0, 8).forEach((p) => {
      box.appendChild(html('span', `${visibleToken(String(p[0]))} ${(+p[1]).toFixed(2)}`, 'tok ' + cls));
    });
    return box;
  }

  // one top context: each token's background opacity is its activation over the context's peak
  function contextView(c) {
    const box = html('div', undefined, 'ctx');
    if (typeof c === 'string') { box.textContent = c; return box; }
    const acts = c.acts || [];
    const top = +c.max_act || Math.max(...acts, 1e-9);
    (c.tokens || []).forEach((t, j) => {
      const span = html('span', String(t).replace(/\n/g, '⏎'));
      const a = +acts[j] || 0;
      if (a > 0) {
        const strength = Math.min(1, a / top);
        span.className = 'act';
        span.dataset.strength = strength.toFixed(4);
        span.style.background = `rgba(249,115,22,${strength.toFixed(4)})`;
        span.title = `activation ${a.toPrecision(3)}`;
      }
      box.appendChild(span);
    });
    return box;
  }

  function dashboardView(dash, n) {
    const frag = document.createDocumentFragment();
    frag.appendChild(html('h3', 'feature dashboard'));
    if (dash.auto_label && dash.auto_label !== n.name) frag.appendChild(html('div', 'auto label: ' + dash.auto_label));
    const facts = [];
    if (dash.density !== undefined) facts.push(`density ${(100 * dash.density).toPrecision(3)}%`);
    if (dash.max_activation !== undefined) facts.push(`max activation ${(+dash.max_activation).toPrecision(4)}`);
    if (facts.length) frag.appendChild(html('div', facts.join(' · '), 'hint facts'));
    for (const [key, title, cls] of [['top_promoted', 'promotes', 'pos'], ['top_suppressed', 'suppresses', 'neg']]) {
      if (dash[key] && dash[key].length) frag.appendChild(tokenList(title, dash[key], cls));
    }
    const ctxs = dash.top_contexts || [];
    if (ctxs.length) frag.appendChild(html('h3', 'top activating contexts'));
    ctxs.slice(0, 8).forEach((c) => frag.appendChild(contextView(c)));
    return frag;
  }

  // -- head loadings and QK attributions (circuits heads --out) --------------------------------------
  // the stored loadings of the link between items a and b, when both are nodes (not supernodes)
  function loadingOf(a, b) {
    if (a.node === undefined || b.node === undefined) return undefined;
    return loadedEdges.get(a.node + ',' + b.node);
  }
  const headName = (h) => `L${h.layer}.H${h.head}`;
  const tokenAt = (p) => (p >= 0 && p < D.tokens.length ? `'${visibleToken(String(D.tokens[p]))}' @${p}` : `@${p}`);
  const signed = (w) => (w >= 0 ? '+' : '') + fmt(w);
  const share = (part, whole) => (whole ? (100 * part / whole).toFixed(1) + '%' : '');
  // a source of a QK attribution: its label, and its position where its id has one (f:L:P:F, e:L:P, t:P)
  function sourceName(label, id) {
    const parts = String(id).split(':');
    const at = { f: 2, e: 2, t: 1 }[parts[0]];
    return at === undefined || parts.length <= at ? String(label) : `${label} @${parts[at]}`;
  }
  // a cell's colour: white blended with blue (+) or red (−) by sqrt(|v| / vmax), as the SVG picture's
  function cellColor(v, vmax) {
    const t = 0.9 * (vmax > 0 ? Math.sqrt(Math.min(1, Math.abs(v) / vmax)) : 0);
    const c = v >= 0 ? [37, 99, 235] : [220, 38, 38];
    return `rgb(${c.map((x) => Math.round(255 + (x - 255) * t)).join(',')})`;
  }
  function cells(tr, tag, texts, cls) {
    texts.forEach((t) => tr.appendChild(html(tag, t, cls)));
    return tr;
  }

  function loadingsView(e) {
    const frag = document.createDocumentFragment();
    frag.appendChild(html('h3', 'attention heads that carry it'));
    frag.appendChild(html('div', 'loading: the part of the edge weight whose last move between positions ' +
      'the head makes (' + (D.head_loadings.definition || 'head loadings') + ')', 'hint'));
    const table = html('table', undefined, 'loadings');
    table.appendChild(cells(html('tr'), 'th', ['head', 'loading', 'share', 'from key']));
    (e.heads || []).forEach((h) => {
      const tr = cells(html('tr'), 'td', [headName(h)]);
      tr.appendChild(html('td', signed(+h.loading), 'w ' + (h.loading >= 0 ? 'pos' : 'neg')));
      tr.appendChild(html('td', share(+h.loading, +e.weight), 'w'));
      tr.appendChild(html('td', tokenAt(h.key_pos)));
      table.appendChild(tr);
    });
    if (e.stay) {
      const tr = cells(html('tr'), 'td', ['stay']);
      tr.appendChild(html('td', signed(+e.stay), 'w ' + (e.stay >= 0 ? 'pos' : 'neg')));
      tr.appendChild(html('td', share(+e.stay, +e.weight), 'w'));
      tr.appendChild(html('td', 'paths that never move'));
      table.appendChild(tr);
    }
    frag.appendChild(table);
    if (e.qk) frag.appendChild(qkView(e.qk));
    return frag;
  }

  function qkView(q) {
    const frag = document.createDocumentFragment();
    frag.appendChild(html('h3', `why ${headName(q)} looked there: QK attribution`));
    const versus = q.versus_pos !== null && q.versus_pos !== undefined ? ` rather than ${tokenAt(q.versus_pos)}` : '';
    const p = (q.pattern_row || [])[q.key_pos];
    frag.appendChild(html('div', `query ${tokenAt(q.query_pos)} → key ${tokenAt(q.key_pos)}${versus}: score ${signed(+q.score)}` +
      (p !== undefined ? `, attention ${(+p).toFixed(3)}` : ''), 'detail qk-facts'));
    if (q.pattern_row) frag.appendChild(attentionStrip(q));
    if (q.matrix) frag.appendChild(pairTable(q.matrix));
    frag.appendChild(sideTable('query side: q^(s) · k', q.query_side || [], 'query-side'));
    frag.appendChild(sideTable('key side: q · k^(t)', q.key_side || [], 'key-side'));
    return frag;
  }

  // the head's attention probabilities over the keys at the query, one bar per key position
  function attentionStrip(q) {
    const box = html('div', undefined, 'attn-strip');
    const top = Math.max(...q.pattern_row, 1e-9);
    q.pattern_row.forEach((p, j) => {
      const bar = html('span', undefined, 'attn' + (j === q.key_pos ? ' key' : '') + (j === q.versus_pos ? ' versus' : ''));
      bar.style.height = (2 + 30 * p / top).toFixed(1) + 'px';
      bar.title = `${tokenAt(j)}: p = ${(+p).toFixed(4)}`;
      box.appendChild(bar);
    });
    return box;
  }

  // rows: query-side sources, columns: key-side sources, each cell a term of the score
  function pairTable(m) {
    const values = m.values || [];
    const vmax = Math.max(0, ...values.flat().map(Math.abs));
    const table = html('table', undefined, 'qk-pairs');
    const head = html('tr');
    head.appendChild(html('th', 'query ↓ key →', 'corner'));
    (m.key_labels || []).forEach((label, c) => {
      const th = html('th', undefined, 'col');
      const name = sourceName(label, m.key_ids[c]);
      th.appendChild(html('span', name));
      th.title = `${name} [${m.key_ids[c]}]`;
      head.appendChild(th);
    });
    table.appendChild(head);
    values.forEach((row, r) => {
      const tr = html('tr');
      const name = sourceName(m.query_labels[r], m.query_ids[r]);
      const th = html('th', name, 'row');
      th.title = `${name} [${m.query_ids[r]}]`;
      tr.appendChild(th);
      row.forEach((v, c) => {
        const td = html('td', undefined, 'cell');
        td.style.background = cellColor(v, vmax);
        td.dataset.value = v;
        td.title = `${name} × ${sourceName(m.key_labels[c], m.key_ids[c])}: ${signed(v)}`;
        tr.appendChild(td);
      });
      table.appendChild(tr);
    });
    return table;
  }

  function sideTable(title, side, cls) {
    const frag = document.createDocumentFragment();
    frag.appendChild(html('h3', title));
    const table = html('table', undefined, cls);
    side.slice(0, 8).forEach((s) => {
      const tr = cells(html('tr'), 'td', [sourceName(s.label, s.id)]);
      tr.appendChild(html('td', signed(+s.value), 'w ' + (s.value >= 0 ? 'pos' : 'neg')));
      table.appendChild(tr);
    });
    frag.appendChild(table);
    return frag;
  }

  function edgePanel(link) {
    const a = current.items[link.from], b = current.items[link.to];
    panel.appendChild(html('h2', `${itemName(a)} → ${itemName(b)}`));
    const where = a.node !== undefined && b.node !== undefined ? ` · from position ${nodes[a.node].pos} to ${nodes[b.node].pos}` : '';
    panel.appendChild(html('div', `edge weight ${signed(link.weight)}${where}`, 'detail'));
    const e = loadingOf(a, b);
    if (e) panel.appendChild(loadingsView(e));
    else if (D.head_loadings) panel.appendChild(html('div', 'no head loadings stored for this edge', 'hint'));
  }

  // the edges into and out of node i that have head loadings
  function nodeLoadings(i) {
    const rows = [];
    loadedEdges.forEach((e, key) => {
      const [s, t] = key.split(',').map(Number);
      if (s === i) rows.push([t, e, '→ ']);
      if (t === i) rows.push([s, e, '← ']);
    });
    const frag = document.createDocumentFragment();
    if (!rows.length) return frag;
    frag.appendChild(html('h3', `edges with head loadings (${rows.length})`));
    const table = html('table', undefined, 'loaded-edges');
    rows.forEach(([j, e, arrow]) => {
      const from = itemOfNode(idToIndex.get(e.source)), to = itemOfNode(idToIndex.get(e.target));
      const link = current.links.find((l) => l[0] === from && l[1] === to);
      const tr = html('tr', undefined, link ? 'link' : 'off');
      const name = html('td', arrow + nodes[j].name);
      const aside = nodeAside(nodes[j]);
      if (aside && aside !== nodes[j].name) name.appendChild(html('span', ' ' + aside, 'aside'));
      tr.appendChild(name);
      const top = (e.heads || [])[0];
      tr.appendChild(html('td', top ? `${headName(top)} ${share(+top.loading, +e.weight)}` : '', 'w'));
      if (link) tr.addEventListener('click', () => focusLink(from, to, link[2]));
      else tr.title = 'hidden at these thresholds';
      table.appendChild(tr);
    });
    frag.appendChild(table);
    return frag;
  }

  function showPanel() {
    panel.textContent = '';
    const f = state.focus;
    if (state.edge !== null) {
      edgePanel(state.edge);
    } else if (f === null) {
      panel.appendChild(html('h2', 'Attribution graph'));
      panel.appendChild(html('div', 'Hover a node for details; click it to see its inputs and outputs. ' +
        'Click an edge for its weight (and the attention heads that carry it, where the graph has head loadings). ' +
        'Drag to pan, scroll to zoom. Shift-click nodes, then “group”, to make a supernode.', 'hint'));
    } else {
      const it = current.items[f];
      panel.appendChild(html('h2', itemName(it)));
      if (it.kind === 'super') {
        panel.appendChild(html('div', `supernode of ${it.members.length} nodes: ` + it.members.map((i) => nodes[i].id).join(', '), 'detail'));
        const ins = [], outs = [];
        current.links.forEach(([a, b, w]) => { if (b === f) ins.push([a, w]); if (a === f) outs.push([b, w]); });
        ins.sort((p, q) => Math.abs(q[1]) - Math.abs(p[1]));
        outs.sort((p, q) => Math.abs(q[1]) - Math.abs(p[1]));
        panel.appendChild(linkTable('inputs', ins));
        panel.appendChild(linkTable('outputs', outs));
      } else {
        nodePanel(nodes[it.node]);
      }
    }
    groupList();
  }

  function nodePanel(n) {
    if (n.kind === 'feature') {
      const source = html('div', SOURCES[n.label_source] || n.label_source, 'label-source ' + n.label_source);
      if (n.sub) source.appendChild(html('span', ' · ' + n.sub, 'aside'));
      panel.appendChild(source);
    }
    panel.appendChild(html('div', n.detail, 'detail'));
    const dash = n.dashboard !== null && n.dashboard !== undefined && D.dashboards ? D.dashboards[n.dashboard] : null;
    if (dash) panel.appendChild(dashboardView(dash, n));
    panel.appendChild(strongestTable('inputs', n.inputs || [], n.n_inputs || 0));
    panel.appendChild(strongestTable('outputs', n.outputs || [], n.n_outputs || 0));
    panel.appendChild(nodeLoadings(idToIndex.get(n.id)));
  }

  function groupList() {
    panel.appendChild(html('h3', `supernodes (${state.groups.length})`));
    if (!state.groups.length) panel.appendChild(html('div', 'none yet', 'hint'));
    state.groups.forEach((g, gi) => {
      const row = html('div', undefined, 'group-row');
      row.appendChild(html('span', `${g.name} · ${g.members.length} nodes`));
      const del = html('button', 'ungroup');
      del.addEventListener('click', () => { state.groups.splice(gi, 1); changedGroups(); });
      row.appendChild(del);
      panel.appendChild(row);
    });
    if (state.selected.size) panel.appendChild(html('div', `${state.selected.size} node(s) selected for grouping`, 'hint'));
  }

  function focusItem(k) {
    state.focus = k;
    state.edge = null;
    applyHighlight();
    showPanel();
  }
  function focusLink(from, to, weight) {
    state.focus = null;
    state.edge = { from, to, weight };
    applyHighlight();
    showPanel();
  }
  function clearFocus() {
    state.focus = null;
    state.edge = null;
    applyHighlight();
    showPanel();
  }

  // -- groups: create, store, download, load ------------------------------------------------------
  // Files and graphs hold {name: [node ids]} (what `circuits render --supernodes` and `circuits intervene
  // --groups` read); lists of {name, members} and Neuronpedia's [[name, id, ...]] load too.
  function groupsFrom(value) {
    const list = Array.isArray(value) ? value : Object.entries(value || {}).map(([name, members]) => ({ name, members }));
    return list.map((g) => (Array.isArray(g) ? { name: String(g[0]), members: g.slice(1) } : { name: String(g.name), members: g.members || [] }))
      .map((g) => ({ name: g.name, members: g.members.map(String).filter((id) => idToIndex.has(id)) }))
      .filter((g) => g.members.length);
  }
  function loadStoredGroups() {
    try {
      const raw = window.localStorage.getItem(storeKey);
      return raw ? groupsFrom(JSON.parse(raw).supernodes) : null;
    } catch (e) { return null; }
  }
  function groupingDocument() {
    const supernodes = {};
    state.groups.forEach((g) => { supernodes[g.name] = g.members.slice(); });
    return { format: 'gemma-circuits-supernodes', version: 1, prompt: D.prompt, model: D.model, supernodes };
  }
  function uniqueName(name) {
    const taken = new Set(state.groups.map((g) => g.name));
    let out = name, k = 2;
    while (taken.has(out)) out = `${name} (${k++})`;
    return out;
  }
  function changedGroups() {
    try { window.localStorage.setItem(storeKey, JSON.stringify(groupingDocument())); } catch (e) { /* storage off (file://, private mode) */ }
    state.focus = null;
    draw();
    showPanel();
  }
  function makeGroup(name, ids) {
    const members = ids.filter((id) => idToIndex.has(id));
    if (members.length < 1) return false;
    const taken = new Set(members);
    state.groups.forEach((g) => { g.members = g.members.filter((m) => !taken.has(m)); });
    state.groups = state.groups.filter((g) => g.members.length);
    state.groups.push({ name: uniqueName(name || `group ${state.groups.length + 1}`), members });
    state.selected.clear();
    changedGroups();
    return true;
  }
  function loadGrouping(doc) {
    const value = doc && !Array.isArray(doc) && doc.supernodes !== undefined ? doc.supernodes : doc;
    if (!value || typeof value !== 'object') throw new Error('no supernodes in this file');
    state.groups = groupsFrom(value);
    changedGroups();
  }

  $('group').addEventListener('click', () => {
    const ids = [...state.selected].map((i) => nodes[i].id);
    const name = window.prompt('Supernode name', `group ${state.groups.length + 1}`);
    if (name !== null) makeGroup(name.trim(), ids);
  });
  $('collapse').addEventListener('change', (e) => { state.collapsed = e.target.checked; state.focus = null; draw(); showPanel(); });
  $('save').addEventListener('click', () => {
    const blob = new Blob([JSON.stringify(groupingDocument(), null, 2)], { type: 'application/json' });
    const a = document.createElement('a');
    a.href = URL.createObjectURL(blob);
    a.download = 'supernodes.json';
    document.body.appendChild(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 1000);
  });
  $('load').addEventListener('click', () => $('load-file').click());
  $('load-file').addEventListener('change', (e) => {
    const file = e.target.files[0];
    if (!file) return;
    file.text().then((text) => loadGrouping(JSON.parse(text))).catch((err) => window.alert('Could not load grouping: ' + err.message));
    e.target.value = '';
  });

  // -- thresholds ----------------------------------------------------------------------------------
  // edge slider: 0 shows every edge; 100 only the strongest; log scale over four decades below the maximum
  const sliderToWeight = (v) => (v <= 0 ? 0 : wmax * Math.pow(10, (v - 100) / 25));
  const weightToSlider = (w) => (w <= 0 ? 0 : Math.max(0, Math.min(100, 100 + 25 * Math.log10(w / wmax))));
  function setEdgeSlider(v) {
    $('edge-slider').value = v;
    state.edgeMin = sliderToWeight(+v);
    $('edge-value').textContent = state.edgeMin ? fmt(state.edgeMin) : 'all';
  }
  function setNodeSlider(v) {
    $('node-slider').value = v;
    state.nodeMin = (+v / 100) ** 2;
    $('node-value').textContent = +v ? state.nodeMin.toFixed(3) : 'all';
  }
  $('edge-slider').addEventListener('input', (e) => { setEdgeSlider(e.target.value); state.focus = null; draw(); showPanel(); });
  $('node-slider').addEventListener('input', (e) => { setNodeSlider(e.target.value); state.focus = null; draw(); showPanel(); });
  {
    // start readable: at most ~250 feature and error nodes, about three edges per node on screen
    const scores = nodes.filter((n) => n.kind === 'feature' || n.kind === 'error').map((n) => n.score).sort((a, b) => b - a);
    setNodeSlider(scores.length > 250 ? Math.floor(100 * Math.sqrt(scores[249])) : 0);
    const shown = nodes.filter(nodeVisible).length;
    const mags = edges.map((e) => Math.abs(e[2])).sort((a, b) => b - a);
    const budget = Math.max(150, 3 * shown);
    setEdgeSlider(mags.length > budget ? Math.floor(weightToSlider(mags[budget - 1])) : 0);
  }

  // -- pan, zoom, hover, click ---------------------------------------------------------------------
  function applyView() {
    const v = state.view;
    viewport.setAttribute('transform', `translate(${v.x},${v.y}) scale(${v.k})`);
  }
  function fit() {
    const r = svg.getBoundingClientRect();
    const k = Math.min(r.width / D.width, r.height / D.height) * 0.97 || 1;
    state.view = { k, x: (r.width - D.width * k) / 2, y: (r.height - D.height * k) / 2 };
    applyView();
  }
  $('fit').addEventListener('click', fit);
  svg.addEventListener('wheel', (e) => {
    e.preventDefault();
    const r = svg.getBoundingClientRect(), v = state.view;
    const px = e.clientX - r.left, py = e.clientY - r.top;
    const k = Math.min(20, Math.max(0.05, v.k * Math.exp(-e.deltaY * 0.0015)));
    state.view = { k, x: px - (px - v.x) * (k / v.k), y: py - (py - v.y) * (k / v.k) };
    applyView();
  }, { passive: false });

  let drag = null;
  svg.addEventListener('mousedown', (e) => {
    if (e.button !== 0) return;
    drag = { x: e.clientX, y: e.clientY, vx: state.view.x, vy: state.view.y, moved: false };
    $('canvas').classList.add('panning');
  });
  window.addEventListener('mousemove', (e) => {
    if (!drag) return;
    const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
    if (Math.abs(dx) + Math.abs(dy) > 3) drag.moved = true;
    state.view.x = drag.vx + dx; state.view.y = drag.vy + dy;
    applyView();
  });
  window.addEventListener('mouseup', (e) => {
    $('canvas').classList.remove('panning');
    const d = drag;
    drag = null;
    if (!d || d.moved) return;
    const g = e.target.closest && e.target.closest('.node');
    const p = !g && e.target.closest && e.target.closest('.edge');
    if (p) { focusLink(+p.dataset.from, +p.dataset.to, +p.dataset.weight); return; }
    if (!g) { clearFocus(); return; }
    const k = +g.dataset.item, it = current.items[k];
    if (e.shiftKey && it.node !== undefined) {
      if (state.selected.has(it.node)) state.selected.delete(it.node); else state.selected.add(it.node);
      applyHighlight(); showPanel();
    } else {
      focusItem(k);
    }
  });

  svg.addEventListener('mouseover', (e) => {
    const g = e.target.closest('.node');
    const p = e.target.closest('.edge');
    let text = null;
    if (g) {
      const it = current.items[+g.dataset.item];
      text = it.kind === 'super' ? `supernode ${it.label}: ${it.members.length} nodes` : nodes[it.node].detail;
      const dash = it.node !== undefined && D.dashboards && D.dashboards[nodes[it.node].dashboard];
      if (dash && dash.auto_label && !text.includes(dash.auto_label)) text += '\nauto label: ' + dash.auto_label;
    } else if (p) {
      const a = current.items[+p.dataset.from], b = current.items[+p.dataset.to];
      text = `${itemName(a)} → ${itemName(b)}\nweight ${fmt(+p.dataset.weight)}`;
      const e = loadingOf(a, b), top = e && (e.heads || [])[0];
      if (top) text += `\ncarried most by ${headName(top)} (${share(+top.loading, +e.weight)}): click for its QK attribution`;
    }
    tooltip.hidden = text === null;
    if (text !== null) tooltip.textContent = text;
  });
  svg.addEventListener('mousemove', (e) => {
    if (tooltip.hidden) return;
    const r = $('canvas').getBoundingClientRect();
    tooltip.style.left = Math.min(e.clientX - r.left + 14, r.width - 200) + 'px';
    tooltip.style.top = (e.clientY - r.top + 14) + 'px';
  });
  svg.addEventListener('mouseleave', () => { tooltip.hidden = true; });
  window.addEventListener('keydown', (e) => {
    if (e.target.tagName === 'INPUT') return;
    if (e.key === 'f') fit();
    if (e.key === 'g' && state.selected.size >= 2) $('group').click();
    if (e.key === 'Escape') { state.selected.clear(); clearFocus(); }
  });
  window.addEventListener('resize', fit);

  // -- start ---------------------------------------------------------------------------------------
  $('prompt').textContent = D.prompt;
  drawStatic();
  draw();
  fit();
  showPanel();

  // a small API for scripts and tests: window.viewer
  window.viewer = {
    state, fit, makeGroup, loadGrouping, groupingDocument,
    focus: (id) => { const k = current.items.findIndex((it) => it.id === id); if (k >= 0) focusItem(k); return k >= 0; },
    focusEdge: (sourceId, targetId) => {
      const a = current.items.findIndex((it) => it.id === sourceId), b = current.items.findIndex((it) => it.id === targetId);
      const link = current.links.find((l) => l[0] === a && l[1] === b);
      if (link) focusLink(a, b, link[2]);
      return link !== undefined;
    },
    visibleIds: () => current.items.map((it) => it.id),
    linkCount: () => current.links.length,
    setEdgeSlider: (v) => { setEdgeSlider(v); draw(); showPanel(); },
    setNodeSlider: (v) => { setNodeSlider(v); draw(); showPanel(); },
    setCollapsed: (on) => { $('collapse').checked = on; state.collapsed = on; state.focus = null; draw(); showPanel(); },
  };
  document.body.dataset.ready = 'true';
})();
