
(function () {
  'use strict';
  var data = JSON.parse(document.getElementById('cell-data').textContent);
  var cols = Object.create(null); data.columns.forEach(function (c, i) { cols[c] = i; });
  var rows = data.rows, imgs = data.thumbnails, PAGE = data.page_size;
  var el = function (tag, cls, text) { var e = document.createElement(tag); if (cls) e.className = cls; if (text != null) e.textContent = String(text); return e; };
  var get = function (r, c) { return r[cols[c]]; };
  var list = function (v) { return Array.isArray(v) ? v : []; };
  var has = function (o, k) { return Object.prototype.hasOwnProperty.call(o, k); };
  // a malformed %-sequence (URIError) makes that key or value unusable, not the page
  var dec = function (x) { try { return decodeURIComponent(x); } catch (e) { return null; } };
  var selType = document.getElementById('f-type'), selFlag = document.getElementById('f-flag'),
      selSlide = document.getElementById('f-slide'), selCons = document.getElementById('f-consistency');
  var grid = document.getElementById('gallery'), count = document.getElementById('gallery-count');

  function state() {
    var s = { type: '', flag: '', slide: '', consistency: '', page: 1, view: '' };
    String(location.hash || '').replace(/^#/, '').split('&').forEach(function (kv) {
      if (!kv) return;
      var i = kv.indexOf('=');
      var k = dec(i < 0 ? kv : kv.slice(0, i)), v = i < 0 ? '' : dec(kv.slice(i + 1));
      if (k === null || v === null || !has(s, k)) return;  // own keys only: no __proto__ & co.
      if (k === 'page') { var n = parseInt(v, 10); s.page = isFinite(n) && n > 1 ? Math.min(n, 1e9) : 1; }
      else s[k] = v;
    });
    return s;
  }
  function setHash(s) {
    var parts = [];
    ['view', 'type', 'flag', 'slide', 'consistency'].forEach(function (k) { if (s[k]) parts.push(k + '=' + encodeURIComponent(s[k])); });
    if (s.page > 1) parts.push('page=' + s.page);
    var h = parts.join('&');
    if (location.hash.replace(/^#/, '') === h) { render(); } else { location.hash = h; }
  }
  function matches(r, s) {
    if (s.type) { var t = get(r, 'cell_type'); if ((s.type === '(untyped)' ? t !== null : t !== s.type)) return false; }
    if (s.slide && get(r, 'slide_id') !== s.slide) return false;
    var flags = list(get(r, 'qc_flags'));
    if (s.flag === '(none)') { if (flags.length) return false; }
    else if (s.flag === '(any)') { if (!flags.length) return false; }
    else if (s.flag && flags.indexOf(s.flag) < 0) return false;
    var c = get(r, 'consistent');
    if (s.consistency === 'inconsistent' && c !== false) return false;
    if (s.consistency === 'consistent' && c !== true) return false;
    if (s.consistency === 'unchecked' && c !== null) return false;
    return true;
  }
  function fmt(x, d) { return (x === null || x === undefined) ? '–' : Number(x).toFixed(d); }
  function card(r, i) {
    var c = el('div', 'cell');
    var t = get(r, 'cell_type');
    c.dataset.type = t === null ? '(untyped)' : String(t);
    c.dataset.flags = list(get(r, 'qc_flags')).join(' ');
    c.dataset.slide = String(get(r, 'slide_id'));
    c.dataset.cell = String(get(r, 'cell_id'));
    if (get(r, 'consistent') === false) c.classList.add('inconsistent');
    var img = el('img'); img.loading = 'lazy'; img.alt = (t || 'cell') + ' ' + get(r, 'cell_id');
    if (typeof imgs[i] === 'string' && /^[A-Za-z0-9+/=]+$/.test(imgs[i])) img.src = 'data:image/jpeg;base64,' + imgs[i];
    c.appendChild(img);
    var b = el('div', 'body');
    b.appendChild(el('div', 'type', (t || 'untyped') + (get(r, 'case') ? ' · ' + get(r, 'case') : '')));
    b.appendChild(el('div', 'cap', get(r, 'caption') || ''));
    var attrs = data.attribute_names.filter(function (a) { return get(r, a) !== null; })
      .map(function (a) { return a.replace(/_/g, ' ') + ': ' + get(r, a); });
    if (attrs.length) b.appendChild(el('div', 'attrs', attrs.join('; ')));
    b.appendChild(el('div', 'morph', 'Ø ' + fmt(get(r, 'cell_diameter_um'), 1) + ' µm · N:C ' + fmt(get(r, 'nc_ratio'), 2) +
      ' · lobes ' + fmt(get(r, 'nucleus_lobes'), 0) + ' · circ ' + fmt(get(r, 'nucleus_circularity'), 2) +
      ' · focus ' + fmt(get(r, 'focus_score'), 0) + ' · logp ' + fmt(get(r, 'caption_logprob'), 2)));
    var badges = el('div');
    list(get(r, 'qc_flags')).forEach(function (f) { badges.appendChild(el('span', 'badge', f)); });
    var cons = get(r, 'consistent');
    if (cons === false) badges.appendChild(el('span', 'badge bad', 'disagrees: ' + list(get(r, 'inconsistent_attributes')).join(', ')));
    else if (cons === true) badges.appendChild(el('span', 'badge ok', 'morphometry agrees'));
    b.appendChild(badges);
    b.appendChild(el('div', 'muted', get(r, 'slide_name') + ' #' + get(r, 'cell_index') + ' @ (' + fmt(get(r, 'centroid_x'), 0) + ', ' + fmt(get(r, 'centroid_y'), 0) + ') px'));
    c.appendChild(b);
    return c;
  }
  function render() {
    var s = state();
    document.body.classList.toggle('gallery-only', s.view === 'gallery');
    selType.value = s.type; selFlag.value = s.flag; selSlide.value = s.slide; selCons.value = s.consistency;
    var idx = [];
    for (var i = 0; i < rows.length; i++) if (matches(rows[i], s)) idx.push(i);
    var pages = Math.max(1, Math.ceil(idx.length / PAGE));
    var page = Math.min(s.page, pages);
    grid.textContent = '';
    var shown = idx.slice((page - 1) * PAGE, page * PAGE), last = undefined;
    shown.forEach(function (i) {
      var t = get(rows[i], 'cell_type');
      if (t !== last) { grid.appendChild(el('div', 'group-title', (t === null ? 'untyped' : t))); last = t; }
      grid.appendChild(card(rows[i], i));
    });
    count.textContent = idx.length + ' of ' + rows.length + ' cells match · page ' + page + ' of ' + pages;
    count.dataset.matching = idx.length; count.dataset.page = page; count.dataset.pages = pages;
    document.getElementById('p-prev').disabled = page <= 1;
    document.getElementById('p-next').disabled = page >= pages;
  }
  function onFilter() {
    setHash({ view: state().view, type: selType.value, flag: selFlag.value, slide: selSlide.value, consistency: selCons.value, page: 1 });
  }
  [selType, selFlag, selSlide, selCons].forEach(function (s) { s.addEventListener('change', onFilter); });
  document.getElementById('p-prev').addEventListener('click', function () { var s = state(); s.page = Math.max(1, s.page - 1); setHash(s); });
  document.getElementById('p-next').addEventListener('click', function () { var s = state(); s.page = s.page + 1; setHash(s); });
  window.addEventListener('hashchange', render);
  // "show its cells" links of the slide sections (no inline handlers: the CSP forbids them)
  Array.prototype.forEach.call(document.querySelectorAll('a[data-show-slide]'), function (a) {
    a.addEventListener('click', function (ev) {
      ev.preventDefault();
      setHash({ view: state().view, type: '', flag: '', slide: a.getAttribute('data-show-slide') || '', consistency: '', page: 1 });
      document.getElementById('cells').scrollIntoView();
    });
  });
  render();
  // a link that carries gallery filters (e.g. report.html#type=lymphocyte) opens on the gallery;
  // #view=gallery&... shows the gallery alone (handy for sharing a filtered set of cells)
  var s0 = state();
  if (s0.view !== 'gallery' && (s0.type || s0.flag || s0.slide || s0.consistency || s0.page > 1)) document.getElementById('cells').scrollIntoView();
  document.body.dataset.galleryReady = '1';
})();
